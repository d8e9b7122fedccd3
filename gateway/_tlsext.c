/* The gateway's TLS accelerator: what Python's ssl module does not expose of OpenSSL.
 *
 * Its services: which certificate a refused device presented, and the TLS version and
 * cipher of a handshake that failed (ssl reports neither until a handshake completes).
 * The first in detail: Python 3.11's ssl has
 * no verify callback and gives no peer certificate after a failed verification
 * (get_unverified_chain is 3.13+), so a refusal could say why (the verify code) but not
 * which certificate. capture_refusals(context) installs an OpenSSL verify callback on the
 * SSL_CTX behind an ssl.SSLContext; on the first verification failure of a connection it
 * keeps the failing chain's leaf (DER, bounded), the X509_V_ERR code and the depth of the
 * certificate that failed, in the connection's own SSL ex_data slot. take_refused(sslobj)
 * hands them to Python right after do_handshake raised, and clears the slot; OpenSSL
 * frees whatever is left with the SSL (ex_data free callback), so nothing outlives its
 * connection and nothing can be mixed up between connections.
 *
 * The callback never changes OpenSSL's verdict: it returns preverify_ok unchanged. On a
 * successful handshake it is called once per certificate of the chain and returns at its
 * first test (bench/tls_capture.py measures the cost).
 *
 * Reaching OpenSSL objects: CPython's _ssl keeps the SSL_CTX* right after PyObject_HEAD of
 * _ssl._SSLContext, and the SSL* after PyObject_HEAD and one PyObject* in _ssl._SSLSocket
 * (unchanged from 3.7 to 3.13). Both types are checked, and capture_refusals checks the
 * pointer it read against the context's own options before using it. The module refuses
 * to load when _ssl resolves OpenSSL to another copy of the library than this module does
 * (a statically linked _ssl, or headers of another OpenSSL version): ex_data indexes and
 * callbacks only mean something within one copy. context_ssl_ctx() is the one place that
 * reaches the SSL_CTX.
 *
 * Idle memory (release_buffers): an idle connection does not keep the handshake's
 * high-water buffers in its two memory BIOs (~3.9 KiB per connection; see
 * bench/README.md, "Memory per held session").
 *
 * Session tickets (set_ticket_keys): Python's ssl has no API for ticket keys, and OpenSSL's
 * own are random per SSL_CTX, so a ticket issued by one worker would not resume on another
 * worker or instance. set_ticket_keys gives the SSL_CTX a key ring (keys shared through a
 * file, gateway/tickets.py): the first key encrypts new tickets, every key decrypts, and a
 * ticket of an older key is renewed under the current one. A ticket's lifetime is the
 * smaller of the setting and what is left of its certificate's validity; a ticket whose
 * certificate is past notAfter (or before notBefore) is ignored at decryption, so the
 * client falls back to a full handshake, where verification refuses it. The ring is
 * guarded by a mutex: handshakes run with the GIL released.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <openssl/core_names.h>
#include <openssl/buffer.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <openssl/x509.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* A leaf bigger than this is not kept (the code and depth still are): device certificates
 * are well under 2 KiB, and what is kept is device-chosen bytes held until the event. */
#define MAX_LEAF_DER 16384

typedef struct {
    int error;       /* X509_V_ERR_* of the first failure */
    int depth;       /* depth of the certificate that failed (0: the leaf itself) */
    int der_len;     /* 0 when no leaf was at hand or it was bigger than MAX_LEAF_DER */
    unsigned char der[];
} Refusal;

typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
} ContextLayout; /* the head of CPython's PySSLContext */

typedef struct {
    PyObject_HEAD
    PyObject *socket;
    SSL *ssl;
} SocketLayout; /* the head of CPython's PySSLSocket */

static int refusal_index = -1;
static PyTypeObject *context_type; /* _ssl._SSLContext */
static PyTypeObject *socket_type;  /* _ssl._SSLSocket */

static void free_refusal(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                         void *argp) {
    (void)parent, (void)ad, (void)idx, (void)argl, (void)argp;
    free(ptr);
}

/* Runs inside SSL_do_handshake, with the GIL released: touches no Python object. */
static int verify_callback(int preverify_ok, X509_STORE_CTX *store) {
    if (preverify_ok) return preverify_ok;
    SSL *ssl = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
    if (ssl == NULL || SSL_get_ex_data(ssl, refusal_index) != NULL) return preverify_ok;
    X509 *leaf = X509_STORE_CTX_get0_cert(store);
    int len = leaf != NULL ? i2d_X509(leaf, NULL) : 0;
    if (len < 0 || len > MAX_LEAF_DER) len = 0;
    Refusal *refusal = malloc(sizeof(Refusal) + (size_t)len);
    if (refusal == NULL) return preverify_ok; /* the refusal stands, unannotated */
    refusal->error = X509_STORE_CTX_get_error(store);
    refusal->depth = X509_STORE_CTX_get_error_depth(store);
    refusal->der_len = 0;
    if (len > 0) {
        unsigned char *out = refusal->der;
        if (i2d_X509(leaf, &out) == len) refusal->der_len = len;
    }
    if (!SSL_set_ex_data(ssl, refusal_index, refusal)) free(refusal);
    return preverify_ok;
}

/* The SSL_CTX behind an ssl.SSLContext, or NULL with an exception set. */
static SSL_CTX *context_ssl_ctx(PyObject *context) {
    if (!PyObject_TypeCheck(context, context_type)) {
        PyErr_SetString(PyExc_TypeError, "expected an ssl.SSLContext");
        return NULL;
    }
    SSL_CTX *ctx = ((ContextLayout *)context)->ctx;
    PyObject *options = PyObject_GetAttrString(context, "options");
    if (options == NULL) return NULL;
    unsigned long long expected = PyLong_AsUnsignedLongLong(options);
    Py_DECREF(options);
    if (expected == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (ctx == NULL || (unsigned long long)SSL_CTX_get_options(ctx) != expected) {
        PyErr_SetString(PyExc_RuntimeError,
                        "ssl.SSLContext layout not recognised (another CPython _ssl?)");
        return NULL;
    }
    return ctx;
}

static PyObject *capture_refusals(PyObject *module, PyObject *context) {
    (void)module;
    SSL_CTX *ctx = context_ssl_ctx(context);
    if (ctx == NULL) return NULL;
    /* The mode is kept; CPython's verify_mode setter keeps the callback it finds. */
    SSL_CTX_set_verify(ctx, SSL_CTX_get_verify_mode(ctx), verify_callback);
    Py_RETURN_NONE;
}

/* A client presents what its certificate file holds and nothing more: OpenSSL's default
 * completes the chain from the trust store (root and issuing CA of chain.pem), which a
 * gateway that trusts the issuing CA does not need. On OpenSSL 3.0 those two extra
 * certificates cost the server ~0.43 ms of CPU per full handshake and ~10 KB per held
 * session (bench/tls_handshake_cpu.py), and the device ~1 KB of upload. */
static PyObject *no_auto_chain(PyObject *module, PyObject *context) {
    (void)module;
    SSL_CTX *ctx = context_ssl_ctx(context);
    if (ctx == NULL) return NULL;
    SSL_CTX_set_mode(ctx, SSL_MODE_NO_AUTO_CHAIN);
    Py_RETURN_NONE;
}

/* The largest Certificate message a peer may send: OpenSSL's default is 100 KiB, and
 * every certificate in it is parsed before any is verified (each ~0.2 ms on OpenSSL 3.0)
 * and kept with the session. 180 certificates under that default cost a server 38 ms of
 * CPU per handshake, 38x a device's, and 0.9 MB per held session
 * (bench/tls_handshake_cpu.py). 16 KiB holds a leaf and several intermediates, RSA-4096
 * ones included; a bigger message ends the handshake (EXCESSIVE_MESSAGE_SIZE) after its
 * 4-byte header, before any of it is parsed. */
#define CLIENT_CHAIN_LIMIT (16 * 1024)

static PyObject *limit_client_chain(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *context;
    Py_ssize_t limit = CLIENT_CHAIN_LIMIT;
    if (!PyArg_ParseTuple(args, "O|n", &context, &limit)) return NULL;
    if (limit < 1024) {
        PyErr_SetString(PyExc_ValueError, "limit_client_chain: at least 1024 bytes");
        return NULL;
    }
    SSL_CTX *ctx = context_ssl_ctx(context);
    if (ctx == NULL) return NULL;
    SSL_CTX_set_max_cert_list(ctx, (long)limit);
    Py_RETURN_NONE;
}

static PyObject *captures(PyObject *module, PyObject *context) {
    (void)module;
    SSL_CTX *ctx = context_ssl_ctx(context);
    if (ctx == NULL) return NULL;
    return PyBool_FromLong(SSL_CTX_get_verify_callback(ctx) == verify_callback);
}

/* The SSL behind an ssl.SSLObject's _sslobj, or NULL (with an exception set if not one). */
static SSL *socket_ssl(PyObject *sslobj) {
    if (!PyObject_TypeCheck(sslobj, socket_type)) {
        PyErr_SetString(PyExc_TypeError, "expected an _ssl._SSLSocket (SSLObject._sslobj)");
        return NULL;
    }
    return ((SocketLayout *)sslobj)->ssl;
}

static PyObject *take_refused(PyObject *module, PyObject *sslobj) {
    (void)module;
    SSL *ssl = socket_ssl(sslobj);
    if (ssl == NULL && PyErr_Occurred()) return NULL;
    Refusal *refusal = ssl != NULL ? SSL_get_ex_data(ssl, refusal_index) : NULL;
    if (refusal == NULL) Py_RETURN_NONE;
    PyObject *result;
    if (refusal->der_len > 0)
        result = Py_BuildValue("(y#ii)", (const char *)refusal->der,
                               (Py_ssize_t)refusal->der_len, refusal->error, refusal->depth);
    else
        result = Py_BuildValue("(Oii)", Py_None, refusal->error, refusal->depth);
    if (result == NULL) return NULL;
    SSL_set_ex_data(ssl, refusal_index, NULL);
    free(refusal);
    return result;
}

/* What ssl's version() and cipher() report only once the handshake is complete. */
static PyObject *negotiated(PyObject *module, PyObject *sslobj) {
    (void)module;
    SSL *ssl = socket_ssl(sslobj);
    if (ssl == NULL) {
        if (PyErr_Occurred()) return NULL;
        return Py_BuildValue("(zz)", NULL, NULL);
    }
    const char *version = SSL_get_version(ssl); /* "unknown" before a version is chosen */
    if (version != NULL && strcmp(version, "unknown") == 0) version = NULL;
    const SSL_CIPHER *cipher = SSL_get_current_cipher(ssl);
    if (cipher == NULL) cipher = SSL_get_pending_cipher(ssl);
    return Py_BuildValue("(zz)", version, cipher != NULL ? SSL_CIPHER_get_name(cipher) : NULL);
}

/* --- idle memory -------------------------------------------------------------------- */

/* A memory BIO keeps the largest buffer it ever held (BUF_MEM only grows): the handshake's
 * flights leave ~1.5-3 KiB in each of a connection's two BIOs. An empty one whose buffer
 * is bigger than keep gets a fresh, empty BUF_MEM (BIO_set_mem_buf frees the old one). */
static void shrink_mem_bio(BIO *bio, size_t keep) {
    if (bio == NULL || BIO_method_type(bio) != BIO_TYPE_MEM || BIO_ctrl_pending(bio) != 0)
        return;
    BUF_MEM *held = NULL;
    BIO_get_mem_ptr(bio, &held);
    if (held == NULL || held->max <= keep) return;
    BUF_MEM *fresh = BUF_MEM_new();
    if (fresh == NULL) return; /* keep the old one: nothing lost but memory */
    BIO_set_mem_buf(bio, fresh, BIO_CLOSE);
}

/* Release what an idle connection does not need: the memory BIOs' buffers beyond keep
 * bytes, and OpenSSL's record buffers if any is left (SSL_MODE_RELEASE_BUFFERS, which
 * CPython sets, normally frees them already). Never loses a byte: a BIO or buffer holding
 * data is left alone. */
static PyObject *release_buffers(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *sslobj;
    Py_ssize_t keep = 0;
    if (!PyArg_ParseTuple(args, "O|n", &sslobj, &keep)) return NULL;
    SSL *ssl = socket_ssl(sslobj);
    if (ssl == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    if (keep < 0) keep = 0;
    (void)SSL_free_buffers(ssl); /* 0: a partial record is buffered, and stays */
    shrink_mem_bio(SSL_get_rbio(ssl), (size_t)keep);
    BIO *wbio = SSL_get_wbio(ssl);
    if (wbio != SSL_get_rbio(ssl)) shrink_mem_bio(wbio, (size_t)keep);
    Py_RETURN_NONE;
}

/* --- session tickets ---------------------------------------------------------------- */

#define TICKET_NAME 16
#define TICKET_AES 32
#define TICKET_HMAC 32
#define TICKET_KEY (TICKET_NAME + TICKET_AES + TICKET_HMAC)
#define MAX_TICKET_KEYS 8

typedef struct {
    unsigned char name[TICKET_NAME];
    unsigned char aes[TICKET_AES];
    unsigned char hmac[TICKET_HMAC];
} TicketKey;

typedef struct {
    pthread_mutex_t lock;
    int count; /* keys[0] encrypts; every key decrypts */
    long lifetime;
    TicketKey keys[MAX_TICKET_KEYS];
} TicketRing;

static int ring_index = -1;
static char sha256_name[] = "SHA256";

static void free_ring(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                      void *argp) {
    (void)parent, (void)ad, (void)idx, (void)argl, (void)argp;
    TicketRing *ring = ptr;
    if (ring == NULL) return;
    pthread_mutex_destroy(&ring->lock);
    OPENSSL_cleanse(ring->keys, sizeof(ring->keys));
    free(ring);
}

static int set_hmac_key(EVP_MAC_CTX *hctx, unsigned char *key) {
    OSSL_PARAM params[3];
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, key, TICKET_HMAC);
    params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, sha256_name, 0);
    params[2] = OSSL_PARAM_construct_end();
    return EVP_MAC_CTX_set_params(hctx, params);
}

/* OpenSSL's ticket key callback (runs inside the handshake, GIL released). Encrypt: the
 * current key, a fresh IV. Decrypt: the key named in the ticket; 0 (not found: a full
 * handshake) if the ring has none of that name, 2 (use, and renew under the current key)
 * if it is not the current one. */
static int ticket_key_cb(SSL *ssl, unsigned char name[16], unsigned char iv[EVP_MAX_IV_LENGTH],
                         EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx, int enc) {
    TicketRing *ring = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ring_index);
    if (ring == NULL) return enc ? -1 : 0;
    TicketKey key;
    int found = -1;
    pthread_mutex_lock(&ring->lock);
    if (enc) {
        if (ring->count > 0) found = 0;
    } else {
        for (int i = 0; i < ring->count; i++)
            if (memcmp(ring->keys[i].name, name, TICKET_NAME) == 0) {
                found = i;
                break;
            }
    }
    if (found >= 0) key = ring->keys[found];
    pthread_mutex_unlock(&ring->lock);
    int result;
    if (found < 0) {
        result = enc ? -1 : 0;
    } else if (enc) {
        memcpy(name, key.name, TICKET_NAME);
        int iv_len = EVP_CIPHER_get_iv_length(EVP_aes_256_cbc());
        result = RAND_bytes(iv, iv_len) == 1 &&
                         EVP_EncryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, key.aes, iv) == 1 &&
                         set_hmac_key(hctx, key.hmac) == 1
                     ? 1
                     : -1;
    } else {
        result = EVP_DecryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, key.aes, iv) == 1 &&
                         set_hmac_key(hctx, key.hmac) == 1
                     ? (found == 0 ? 1 : 2)
                     : -1;
    }
    OPENSSL_cleanse(&key, sizeof(key));
    return result;
}

/* Seconds from now to the certificate's notAfter (negative once past; 0 before notBefore). */
static long validity_left(X509 *cert) {
    int days = 0, seconds = 0;
    if (X509_cmp_current_time(X509_get0_notBefore(cert)) >= 0) return 0;
    if (!ASN1_TIME_diff(&days, &seconds, NULL, X509_get0_notAfter(cert))) return 0;
    return (long)days * 86400L + seconds;
}

/* A new ticket lives min(lifetime, what is left of its certificate's validity). */
static int ticket_generated(SSL *ssl, void *arg) {
    (void)arg;
    SSL_SESSION *session = SSL_get0_session(ssl);
    TicketRing *ring = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ring_index);
    if (session == NULL || ring == NULL) return 0;
    pthread_mutex_lock(&ring->lock);
    long timeout = ring->lifetime;
    pthread_mutex_unlock(&ring->lock);
    X509 *peer = SSL_SESSION_get0_peer(session);
    if (peer != NULL) {
        long left = validity_left(peer);
        if (left < timeout) timeout = left;
    }
    if (timeout < 1) timeout = 1; /* 0 would mean OpenSSL's default; decryption refuses it */
    SSL_SESSION_set_timeout(session, timeout);
    return 1;
}

/* A decrypted ticket resumes only within its lifetime and its certificate's validity. */
static SSL_TICKET_RETURN ticket_decrypted(SSL *ssl, SSL_SESSION *session,
                                          const unsigned char *keyname, size_t keyname_len,
                                          SSL_TICKET_STATUS status, void *arg) {
    (void)ssl, (void)keyname, (void)keyname_len, (void)arg;
    /* _RENEW: a new ticket after the full handshake (TLS 1.2: an empty ticket extension
     * asks for one, and plain IGNORE would turn that into "no ticket"). */
    if (status == SSL_TICKET_EMPTY || status == SSL_TICKET_NO_DECRYPT)
        return SSL_TICKET_RETURN_IGNORE_RENEW;
    if (status != SSL_TICKET_SUCCESS && status != SSL_TICKET_SUCCESS_RENEW)
        return SSL_TICKET_RETURN_IGNORE;
    X509 *peer = session != NULL ? SSL_SESSION_get0_peer(session) : NULL;
    if (peer == NULL || validity_left(peer) <= 0) return SSL_TICKET_RETURN_IGNORE_RENEW;
    /* The lifetime, checked here too: not every OpenSSL path checks it on TLS 1.3. */
    if ((long)(time(NULL) - SSL_SESSION_get_time(session)) >= SSL_SESSION_get_timeout(session))
        return SSL_TICKET_RETURN_IGNORE_RENEW;
    return status == SSL_TICKET_SUCCESS_RENEW ? SSL_TICKET_RETURN_USE_RENEW
                                              : SSL_TICKET_RETURN_USE;
}

static PyObject *set_ticket_keys(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *context;
    Py_buffer keys;
    long lifetime;
    if (!PyArg_ParseTuple(args, "Oy*l", &context, &keys, &lifetime)) return NULL;
    PyObject *result = NULL;
    SSL_CTX *ctx = context_ssl_ctx(context);
    if (ctx == NULL) goto done;
    if (keys.len == 0 || keys.len % TICKET_KEY != 0 || keys.len / TICKET_KEY > MAX_TICKET_KEYS) {
        PyErr_Format(PyExc_ValueError, "ticket keys: 1 to %d keys of %d bytes", MAX_TICKET_KEYS,
                     TICKET_KEY);
        goto done;
    }
    if (lifetime < 1) {
        PyErr_SetString(PyExc_ValueError, "ticket lifetime: at least 1 second");
        goto done;
    }
    TicketRing *ring = SSL_CTX_get_ex_data(ctx, ring_index);
    if (ring == NULL) {
        ring = calloc(1, sizeof(TicketRing));
        if (ring == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        pthread_mutex_init(&ring->lock, NULL);
        if (!SSL_CTX_set_ex_data(ctx, ring_index, ring)) {
            free_ring(NULL, ring, NULL, 0, 0, NULL);
            PyErr_SetString(PyExc_RuntimeError, "SSL_CTX_set_ex_data failed");
            goto done;
        }
        static const unsigned char sid_ctx[] = "devicegate";
        if (!SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof(sid_ctx) - 1) ||
            !SSL_CTX_set_session_ticket_cb(ctx, ticket_generated, ticket_decrypted, NULL) ||
            !SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ticket_key_cb)) {
            PyErr_SetString(PyExc_RuntimeError, "cannot install the session ticket callbacks");
            goto done;
        }
        /* Tickets only: no server-side cache, so workers share nothing but the keys. */
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    }
    SSL_CTX_set_timeout(ctx, lifetime);
    pthread_mutex_lock(&ring->lock);
    OPENSSL_cleanse(ring->keys, sizeof(ring->keys));
    ring->count = (int)(keys.len / TICKET_KEY);
    memcpy(ring->keys, keys.buf, (size_t)keys.len);
    ring->lifetime = lifetime;
    pthread_mutex_unlock(&ring->lock);
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&keys);
    return result;
}

/* --- PKCS#11 private keys: declarations (the section is at the end of the file) ----- */
static PyObject *use_engine_key(PyObject *module, PyObject *args, PyObject *kwargs);
static PyObject *pkcs11_token_labels(PyObject *module, PyObject *args);
/* --- end PKCS#11 declarations -------------------------------------------------------- */
/* --- IDevID enrollment: declarations (definitions in the section at the end) --------- */
static PyObject *export_keying_material(PyObject *module, PyObject *args);
static PyObject *accept_any_peer_certificate(PyObject *module, PyObject *context);

static PyMethodDef methods[] = {
    {"capture_refusals", capture_refusals, METH_O,
     "Install the verify callback that keeps a refused connection's leaf certificate."},
    {"captures", captures, METH_O, "Whether capture_refusals is in effect on a context."},
    {"limit_client_chain", limit_client_chain, METH_VARARGS,
     "limit_client_chain(context, limit=16384): refuse a peer Certificate message over limit "
     "bytes before parsing it (OpenSSL's default: 100 KiB)."},
    {"no_auto_chain", no_auto_chain, METH_O,
     "Present only the certificate file's own chain (no chain completed from the trust "
     "store)."},
    {"take_refused", take_refused, METH_O,
     "(leaf DER or None, X509_V_ERR code, depth) of a refused connection, once; else None."},
    {"negotiated", negotiated, METH_O,
     "(TLS version, cipher) chosen so far, also of a handshake that did not complete."},
    {"set_ticket_keys", set_ticket_keys, METH_VARARGS,
     "set_ticket_keys(context, keys, lifetime): session tickets under these keys (80 bytes "
     "each: name, AES-256, HMAC-SHA256; the first encrypts), living at most lifetime s."},
    /* --- PKCS#11 private keys (the section at the end of the file) --- */
    {"use_engine_key", (PyCFunction)(void (*)(void))use_engine_key, METH_VARARGS | METH_KEYWORDS,
     "use_engine_key(context, certfile, key_uri, module_path, pin, engine_path=None): present "
     "certfile's chain with the private key key_uri of a PKCS#11 token (OpenSSL's pkcs11 "
     "engine); the key never leaves the token."},
    {"pkcs11_token_labels", pkcs11_token_labels, METH_VARARGS,
     "pkcs11_token_labels(module_path): the labels of the tokens present in the module's "
     "slots (to explain a key that was not found)."},
    /* --- end PKCS#11 entries --- */
    /* IDevID enrollment (provisioning) */
    {"export_keying_material", export_keying_material, METH_VARARGS,
     "export_keying_material(ssl_object, label, length, context): RFC 5705 / RFC 8446 7.5 "
     "keying material of a completed handshake (context None: no context)."},
    {"accept_any_peer_certificate", accept_any_peer_certificate, METH_O,
     "Let the handshake complete whatever chain the peer presents (proof of possession is "
     "still checked); the application must verify the certificate itself."},
    {"release_buffers", release_buffers, METH_VARARGS,
     "release_buffers(sslobj, keep=0): free an idle connection's empty record buffers and "
     "the buffers of its empty memory BIOs that are bigger than keep bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gateway._tlsext",
    .m_doc = "The gateway's TLS accelerator: OpenSSL services Python's ssl lacks.",
    .m_size = -1,
    .m_methods = methods,
};

/* 0 when _ssl's OpenSSL is this module's, else -1 with ImportError set. */
static int same_openssl(PyObject *ssl_module) {
    void *theirs = NULL;
    PyObject *file = PyObject_GetAttrString(ssl_module, "__file__");
    if (file == NULL) {
        PyErr_Clear(); /* built into the interpreter: look in the global scope */
        theirs = dlsym(RTLD_DEFAULT, "SSL_CTX_new");
    } else {
        const char *path = PyUnicode_AsUTF8(file);
        void *handle = path != NULL ? dlopen(path, RTLD_LAZY | RTLD_NOLOAD) : NULL;
        if (handle != NULL) {
            theirs = dlsym(handle, "SSL_CTX_new");
            dlclose(handle);
        }
        Py_DECREF(file);
        PyErr_Clear();
    }
    if (theirs == NULL || theirs != (void *)&SSL_CTX_new) {
        PyErr_SetString(PyExc_ImportError,
                        "gateway._tlsext links another OpenSSL than Python's _ssl");
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__tlsext(void) {
    PyObject *ssl_module = PyImport_ImportModule("_ssl");
    if (ssl_module == NULL) return NULL;
    if (same_openssl(ssl_module) < 0) goto fail;
    context_type = (PyTypeObject *)PyObject_GetAttrString(ssl_module, "_SSLContext");
    socket_type = (PyTypeObject *)PyObject_GetAttrString(ssl_module, "_SSLSocket");
    if (context_type == NULL || socket_type == NULL) goto fail;
    if (!PyType_Check(context_type) || !PyType_Check(socket_type)) {
        PyErr_SetString(PyExc_ImportError, "_ssl has no _SSLContext/_SSLSocket types");
        goto fail;
    }
    refusal_index = SSL_get_ex_new_index(0, "devicegate refusal", NULL, NULL, free_refusal);
    if (refusal_index < 0) {
        PyErr_SetString(PyExc_ImportError, "no OpenSSL ex_data index left");
        goto fail;
    }
    ring_index = SSL_CTX_get_ex_new_index(0, "devicegate tickets", NULL, NULL, free_ring);
    if (ring_index < 0) {
        PyErr_SetString(PyExc_ImportError, "no OpenSSL ex_data index left");
        goto fail;
    }
    Py_DECREF(ssl_module);
    return PyModule_Create(&module_def);
fail:
    Py_DECREF(ssl_module);
    return NULL;
}

/* === PKCS#11 private keys (use_engine_key, pkcs11_token_labels) ========================
 *
 * A device's identity key may live in a secure element or TPM that only speaks PKCS#11:
 * the key cannot be read out, only asked to sign. Python's ssl takes private keys from
 * files only (load_cert_chain), so use_engine_key hands the SSL_CTX behind an
 * ssl.SSLContext a key of OpenSSL's "pkcs11" engine (libp11's engine_pkcs11; OpenSSL 3.0
 * still runs engines, and Debian bookworm has no pkcs11-provider). The EVP_PKEY it loads
 * is a handle: every signature of a handshake is a C_Sign in the token (with the GIL
 * released, as handshakes run).
 *
 * Lifetimes. SSL_CTX_use_PrivateKey takes its own reference to the key; ours is dropped.
 * The engine is NOT finished or freed, on purpose: libp11 frees every key object of its
 * slots when its engine finishes (ctx_finish), while an SSL_CTX may still hold an EVP_PKEY
 * whose EC_KEY/RSA points at one (a use-after-free at the next handshake). It could not
 * finish anyway: libp11 keeps each key's EVP_PKEY cached in its key object, and that
 * EVP_PKEY holds a functional reference on the engine (EVP_PKEY_set1_engine in its
 * load_privkey). So one initialised engine is kept per (engine path, module path) for the
 * life of the process and reused by later calls (MAX_ENGINES: a device has one or two
 * tokens); loading the same key again returns libp11's cached EVP_PKEY, so repeated calls
 * do not grow memory. PKCS#11 login state is per process anyway (C_Login holds for all
 * sessions of the application), so a second engine would not add isolation.
 *
 * The PIN is given to the engine by its "PIN" control (libp11 keeps a copy to log in again
 * after fork); it never appears in a URI here. OpenSSL's interactive UI is replaced by
 * UI_null(): an agent must never wait on a terminal for a PIN.
 *
 * Errors are one-line Python exceptions: FileNotFoundError/OSError (the module or the
 * engine cannot be loaded), PermissionError (wrong or locked PIN), LookupError (no such
 * key), ValueError (the key does not match the certificate, or a bad certificate file).
 * The OpenSSL error queue is emptied on every path, so nothing stale reaches ssl.
 *
 * The engine API is deprecated in OpenSSL 3.0 (not removed). The headers were included
 * above without OPENSSL_SUPPRESS_DEPRECATED (the rest of the module should keep its
 * warnings), so the deprecation warnings are silenced for this section only.
 */
#include <openssl/err.h>
#include <openssl/ui.h>
#include <unistd.h>
#ifndef OPENSSL_NO_ENGINE
#include <openssl/engine.h>
#endif

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

#define MAX_ENGINES 4

/* The beginning of PKCS#11's CK_FUNCTION_LIST: its order is fixed by the standard, and
 * only the first seven entries are called. (No pkcs11.h is needed to build.) */
typedef unsigned long p11_ulong;
typedef struct {
    unsigned char major, minor;
} p11_version;
typedef struct p11_functions {
    p11_version version;
    p11_ulong (*C_Initialize)(void *args);
    p11_ulong (*C_Finalize)(void *reserved);
    p11_ulong (*C_GetInfo)(void *info);
    p11_ulong (*C_GetFunctionList)(struct p11_functions **list);
    p11_ulong (*C_GetSlotList)(unsigned char token_present, p11_ulong *slots, p11_ulong *count);
    p11_ulong (*C_GetSlotInfo)(p11_ulong slot, void *info);
    p11_ulong (*C_GetTokenInfo)(p11_ulong slot, void *info);
} p11_functions;
#define P11_CKR_OK 0x0UL
#define P11_CKR_ALREADY_INITIALIZED 0x191UL
#define P11_CKR_PIN_INCORRECT 0xA0UL
#define P11_CKR_PIN_INVALID 0xA1UL
#define P11_CKR_PIN_LEN_RANGE 0xA2UL
#define P11_CKR_PIN_EXPIRED 0xA3UL
#define P11_CKR_PIN_LOCKED 0xA4UL
#define P11_MAX_SLOTS 64
#define P11_CKF_TOKEN_INITIALIZED 0x400UL

/* dlopen the module and find C_GetFunctionList, or NULL with OSError set. */
static void *open_module(const char *path, p11_functions **functions) {
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        const char *why = dlerror();
        if (access(path, F_OK) != 0)
            PyErr_Format(PyExc_FileNotFoundError, "PKCS#11 module %s: no such file", path);
        else
            PyErr_Format(PyExc_OSError, "PKCS#11 module %s cannot be loaded: %s", path,
                         why != NULL ? why : "dlopen failed");
        return NULL;
    }
    p11_ulong (*get_list)(p11_functions **) =
        (p11_ulong(*)(p11_functions **))dlsym(handle, "C_GetFunctionList");
    p11_functions *list = NULL;
    if (get_list == NULL || get_list(&list) != P11_CKR_OK || list == NULL) {
        dlclose(handle);
        PyErr_Format(PyExc_OSError, "%s is not a PKCS#11 module (no C_GetFunctionList)", path);
        return NULL;
    }
    if (functions != NULL) *functions = list;
    return handle;
}

/* The labels of the tokens present, blank padding removed. Used to explain a failure, so
 * it never logs in: a PIN is tried once, by the engine. */
static PyObject *pkcs11_token_labels(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *path_bytes;
    if (!PyArg_ParseTuple(args, "O&", PyUnicode_FSConverter, &path_bytes)) return NULL;
    PyObject *result = NULL;
    p11_functions *p11 = NULL;
    void *handle = open_module(PyBytes_AS_STRING(path_bytes), &p11);
    if (handle == NULL) goto done;
    p11_ulong rv = p11->C_Initialize(NULL);
    int ours = rv == P11_CKR_OK; /* else already initialised by the engine: not ours */
    if (!ours && rv != P11_CKR_ALREADY_INITIALIZED) {
        PyErr_Format(PyExc_OSError, "PKCS#11 C_Initialize failed: CKR %lu", rv);
        goto close;
    }
    p11_ulong slots[P11_MAX_SLOTS];
    p11_ulong count = P11_MAX_SLOTS;
    rv = p11->C_GetSlotList(1, slots, &count);
    if (rv != P11_CKR_OK) {
        PyErr_Format(PyExc_OSError, "PKCS#11 C_GetSlotList failed: CKR %lu", rv);
        goto finalize;
    }
    result = PyList_New(0);
    for (p11_ulong i = 0; result != NULL && i < count; i++) {
        /* CK_TOKEN_INFO is about 210 bytes; the label is its first field. */
        union {
            p11_ulong align;
            unsigned char bytes[1024];
        } info;
        if (p11->C_GetTokenInfo(slots[i], &info) != P11_CKR_OK) continue;
        /* flags follow label[32], manufacturerID[32], model[16], serialNumber[16] */
        p11_ulong flags;
        memcpy(&flags, info.bytes + 96, sizeof(flags));
        if (!(flags & P11_CKF_TOKEN_INITIALIZED)) continue;
        Py_ssize_t len = 32;
        while (len > 0 && info.bytes[len - 1] == ' ') len--;
        PyObject *label = PyUnicode_DecodeUTF8((const char *)info.bytes, len, "replace");
        if (label == NULL || PyList_Append(result, label) < 0) Py_CLEAR(result);
        Py_XDECREF(label);
    }
finalize:
    if (ours) p11->C_Finalize(NULL);
close:
    dlclose(handle);
done:
    Py_DECREF(path_bytes);
    return result;
}

#ifndef OPENSSL_NO_ENGINE

typedef struct {
    char *engine_path; /* "" for OpenSSL's engines directory */
    char *module_path;
    ENGINE *engine; /* initialised (a functional reference), never finished: see above */
} KeptEngine;

static KeptEngine kept_engines[MAX_ENGINES];
static int kept_count;

/* A new initialised pkcs11 engine for module_path, or NULL with an exception set. */
static ENGINE *new_engine(const char *engine_path, const char *module_path) {
    ENGINE *engine;
    if (engine_path[0] != '\0') {
        engine = ENGINE_by_id("dynamic");
        if (engine != NULL &&
            (!ENGINE_ctrl_cmd_string(engine, "SO_PATH", engine_path, 0) ||
             !ENGINE_ctrl_cmd_string(engine, "ID", "pkcs11", 0) ||
             !ENGINE_ctrl_cmd_string(engine, "LIST_ADD", "0", 0) ||
             !ENGINE_ctrl_cmd_string(engine, "LOAD", NULL, 0))) {
            ENGINE_free(engine);
            engine = NULL;
        }
        if (engine == NULL) {
            PyErr_Format(PyExc_OSError, "cannot load OpenSSL's pkcs11 engine from %s",
                         engine_path);
            return NULL;
        }
    } else {
        engine = ENGINE_by_id("pkcs11");
        if (engine == NULL) {
            PyErr_SetString(PyExc_OSError,
                            "OpenSSL has no pkcs11 engine (install libengine-pkcs11-openssl)");
            return NULL;
        }
    }
    /* QUIET: libp11 would print its diagnostics on stderr; the caller gets one line. */
    if (!ENGINE_ctrl_cmd_string(engine, "QUIET", NULL, 0) ||
        !ENGINE_ctrl_cmd_string(engine, "MODULE_PATH", module_path, 0) ||
        !ENGINE_init(engine)) {
        ENGINE_free(engine);
        PyErr_SetString(PyExc_OSError, "OpenSSL's pkcs11 engine refused its settings");
        return NULL;
    }
    ENGINE_free(engine); /* the structural reference of ENGINE_by_id; init's remains */
    return engine;
}

/* The kept engine for (engine_path, module_path), made at first use. Runs with the GIL
 * held, which guards kept_engines. */
static ENGINE *kept_engine(const char *engine_path, const char *module_path) {
    for (int i = 0; i < kept_count; i++)
        if (strcmp(kept_engines[i].engine_path, engine_path) == 0 &&
            strcmp(kept_engines[i].module_path, module_path) == 0)
            return kept_engines[i].engine;
    if (kept_count == MAX_ENGINES) {
        PyErr_Format(PyExc_OSError, "more than %d PKCS#11 modules in one process",
                     MAX_ENGINES);
        return NULL;
    }
    char *engine_copy = strdup(engine_path), *module_copy = strdup(module_path);
    if (engine_copy == NULL || module_copy == NULL) {
        free(engine_copy);
        free(module_copy);
        PyErr_NoMemory();
        return NULL;
    }
    ENGINE *engine = new_engine(engine_path, module_path);
    if (engine == NULL) {
        free(engine_copy);
        free(module_copy);
        return NULL;
    }
    kept_engines[kept_count++] = (KeptEngine){engine_copy, module_copy, engine};
    return engine;
}

/* Sets the exception for a failed ENGINE_load_private_key from OpenSSL's error queue:
 * libp11 queues the PKCS#11 return code (library "PKCS#11 module", reason = CKR_*). */
static void key_load_error(const char *uri) {
    unsigned long error, pin_error = 0, other = 0;
    while ((error = ERR_get_error()) != 0) {
        const char *lib = ERR_lib_error_string(error);
        int from_module = lib != NULL && strcmp(lib, "PKCS#11 module") == 0;
        unsigned long reason = (unsigned long)ERR_GET_REASON(error);
        if (from_module && reason >= P11_CKR_PIN_INCORRECT && reason <= P11_CKR_PIN_LOCKED)
            pin_error = reason;
        else if (from_module && other == 0)
            other = error;
    }
    if (pin_error == P11_CKR_PIN_LOCKED)
        PyErr_SetString(PyExc_PermissionError, "the token's PIN is locked (CKR_PIN_LOCKED)");
    else if (pin_error == P11_CKR_PIN_EXPIRED)
        PyErr_SetString(PyExc_PermissionError, "the token's PIN has expired (CKR_PIN_EXPIRED)");
    else if (pin_error != 0)
        PyErr_Format(PyExc_PermissionError, "the token refused the PIN (%s)",
                     pin_error == P11_CKR_PIN_INCORRECT ? "CKR_PIN_INCORRECT"
                     : pin_error == P11_CKR_PIN_INVALID ? "CKR_PIN_INVALID"
                                                        : "CKR_PIN_LEN_RANGE");
    else if (other != 0)
        PyErr_Format(PyExc_LookupError, "no private key at %s (PKCS#11: %s)", uri,
                     ERR_reason_error_string(other) != NULL ? ERR_reason_error_string(other)
                                                            : "error");
    else
        PyErr_Format(PyExc_LookupError, "no private key at %s", uri);
}

static PyObject *use_engine_key(PyObject *module, PyObject *args, PyObject *kwargs) {
    (void)module;
    static char *keywords[] = {"context",     "certfile",    "key_uri", "module_path",
                               "pin",         "engine_path", NULL};
    PyObject *context, *cert_bytes = NULL, *module_bytes = NULL, *engine_arg = Py_None;
    PyObject *engine_bytes = NULL, *result = NULL;
    const char *uri, *pin;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO&sO&z|O", keywords, &context,
                                     PyUnicode_FSConverter, &cert_bytes, &uri,
                                     PyUnicode_FSConverter, &module_bytes, &pin, &engine_arg))
        goto done;
    if (engine_arg != Py_None && !PyUnicode_FSConverter(engine_arg, &engine_bytes)) goto done;
    const char *engine_path = engine_bytes != NULL ? PyBytes_AS_STRING(engine_bytes) : "";
    const char *module_path = PyBytes_AS_STRING(module_bytes);
    SSL_CTX *ctx = context_ssl_ctx(context);
    if (ctx == NULL) goto done;
    if (strncmp(uri, "pkcs11:", 7) != 0) {
        PyErr_SetString(PyExc_ValueError, "key_uri: not a pkcs11: URI");
        goto done;
    }
    /* A module that cannot be loaded is said plainly (libp11 would say "not found"). */
    void *handle = open_module(module_path, NULL);
    if (handle == NULL) goto done;
    dlclose(handle);

    ERR_clear_error();
    /* The certificate first: a bad file is found before the token is touched. */
    if (SSL_CTX_use_certificate_chain_file(ctx, PyBytes_AS_STRING(cert_bytes)) != 1) {
        ERR_clear_error();
        PyErr_Format(PyExc_ValueError, "cannot read a PEM certificate chain from %s",
                     PyBytes_AS_STRING(cert_bytes));
        goto done;
    }
    ENGINE *engine = kept_engine(engine_path, module_path);
    if (engine == NULL) goto clear;
    if (pin != NULL && !ENGINE_ctrl_cmd_string(engine, "PIN", pin, 0)) {
        PyErr_SetString(PyExc_ValueError, "the engine refused the PIN (too long?)");
        goto clear;
    }
    EVP_PKEY *key = ENGINE_load_private_key(engine, uri, (UI_METHOD *)UI_null(), NULL);
    if (key == NULL) {
        key_load_error(uri);
        goto clear;
    }
    /* SSL_CTX_use_PrivateKey takes its own reference (and refuses a key that does not
     * match the certificate); SSL_CTX_check_private_key says so explicitly. */
    int ok = SSL_CTX_use_PrivateKey(ctx, key) == 1 && SSL_CTX_check_private_key(ctx) == 1;
    EVP_PKEY_free(key);
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "the key at %s does not match the certificate %s", uri,
                     PyBytes_AS_STRING(cert_bytes));
        goto clear;
    }
    result = Py_NewRef(Py_None);
clear:
    ERR_clear_error();
done:
    Py_XDECREF(cert_bytes);
    Py_XDECREF(module_bytes);
    Py_XDECREF(engine_bytes);
    return result;
}

#else /* OPENSSL_NO_ENGINE */

static PyObject *use_engine_key(PyObject *module, PyObject *args, PyObject *kwargs) {
    (void)module, (void)args, (void)kwargs;
    PyErr_SetString(PyExc_OSError, "this OpenSSL was built without engines (no PKCS#11 keys)");
    return NULL;
}

#endif /* OPENSSL_NO_ENGINE */

#pragma GCC diagnostic pop
/* === end PKCS#11 private keys ========================================================== */
/* === IDevID enrollment (provisioning/enrollment/idevid.py) ============================
 *
 * export_keying_material: RFC 9266 tls-exporter channel binding needs SSL_export_keying_
 * material, which Python's ssl lacks. It reaches the SSL* the way take_refused does; it
 * also takes the Python wrappers (ssl.SSLSocket, ssl.SSLObject) and uses their _sslobj.
 *
 * accept_any_peer_certificate: the provisioning listener must see manufacturer (IDevID)
 * certificates of CAs it does not know yet and refuse them with a recorded reason, and the
 * trusted set changes at run time. OpenSSL would end such a handshake at verification, so
 * this callback accepts every chain; the client's CertificateVerify (possession of the
 * leaf's key) is still checked by OpenSSL, independently of chain verification. Every
 * route that uses the certificate verifies it in Python (renewal: signed by the issuing
 * CA and a row of ours; IDevID: the fleet's manufacturer path validation).
 */

static SSL *wrapped_ssl(PyObject *object) {
    if (PyObject_TypeCheck(object, socket_type)) return ((SocketLayout *)object)->ssl;
    PyObject *inner = PyObject_GetAttrString(object, "_sslobj");
    if (inner == NULL) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "expected an ssl.SSLSocket or ssl.SSLObject");
        return NULL;
    }
    SSL *ssl = NULL;
    if (PyObject_TypeCheck(inner, socket_type)) ssl = ((SocketLayout *)inner)->ssl;
    else if (inner == Py_None) PyErr_SetString(PyExc_ValueError, "the TLS connection is closed");
    else PyErr_SetString(PyExc_TypeError, "expected an ssl.SSLSocket or ssl.SSLObject");
    Py_DECREF(inner);
    if (ssl == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "no TLS connection");
    return ssl;
}

static PyObject *export_keying_material(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *object, *context_arg;
    const char *label;
    Py_ssize_t label_len, length;
    if (!PyArg_ParseTuple(args, "Os#nO", &object, &label, &label_len, &length, &context_arg))
        return NULL;
    if (length < 1 || length > 1024) {
        PyErr_SetString(PyExc_ValueError, "length: 1 to 1024 bytes");
        return NULL;
    }
    Py_buffer context = {0};
    int use_context = context_arg != Py_None;
    if (use_context && PyObject_GetBuffer(context_arg, &context, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *result = NULL;
    SSL *ssl = wrapped_ssl(object);
    if (ssl == NULL) goto done;
    if (!SSL_is_init_finished(ssl)) {
        PyErr_SetString(PyExc_ValueError, "the TLS handshake is not complete");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, length);
    if (result == NULL) goto done;
    if (SSL_export_keying_material(ssl, (unsigned char *)PyBytes_AS_STRING(result),
                                   (size_t)length, label, (size_t)label_len,
                                   use_context ? context.buf : NULL,
                                   use_context ? (size_t)context.len : 0, use_context) != 1) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_ValueError, "SSL_export_keying_material failed");
    }
done:
    if (use_context) PyBuffer_Release(&context);
    return result;
}

/* Runs inside the handshake, GIL released: touches no Python object. */
static int accept_any_callback(int preverify_ok, X509_STORE_CTX *store) {
    (void)preverify_ok, (void)store;
    return 1;
}

static PyObject *accept_any_peer_certificate(PyObject *module, PyObject *context) {
    (void)module;
    SSL_CTX *ctx = context_ssl_ctx(context);
    if (ctx == NULL) return NULL;
    SSL_CTX_set_verify(ctx, SSL_CTX_get_verify_mode(ctx), accept_any_callback);
    Py_RETURN_NONE;
}
/* === end of IDevID enrollment ========================================================= */
