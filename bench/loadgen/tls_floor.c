/* OpenSSL alone, with no server around it: the floor under any mTLS server's reconnect.
 *
 * In one thread, a client and a server SSL exchange flights through memory BIOs, as
 * bench/tls_handshake_cpu.py does with the gateway's `TlsPump`, but without Python. The
 * server is configured like `gateway.tls.server_context`: TLS 1.2 minimum (TLS 1.3 is
 * negotiated), client certificate required and verified against the CA file with
 * X509_V_FLAG_PARTIAL_CHAIN, no compression or renegotiation, one ticket per full
 * handshake and none on a resumed one (a ticket key callback, as the gateway's). Only the server's calls are timed
 * (CLOCK_THREAD_CPUTIME_ID). Variants alternate per round: full handshakes (no session
 * offered) and resumed ones (TLS 1.3 PSK with ECDHE, from the last ticket); each figure is
 * the median of the rounds' means.
 *
 * Then it holds HOLD handshaken server connections, each with fresh empty BIOs and its
 * record buffers freed (what the gateway does once a session is idle), frees the client
 * side, and prints the heap they keep (mallinfo2): the TLS state per held session that a
 * server on this OpenSSL cannot go below through its API.
 *
 * Usage: tls_floor CA_FILE SERVER_CERT SERVER_KEY DEVICE_CERT DEVICE_KEY N ROUNDS HOLD
 * (DEVICE_CERT may hold the device's chain: the client sends what the file holds. ROUNDS 0:
 * memory only.)
 * Prints one line: "<full ms> <resumed ms> <held bytes per connection> <resumed count>".
 *
 * Build: cc -O2 -o tls_floor tls_floor.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double thread_cpu(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *values, int count) {
    if (count == 0)
        return 0.0;
    qsort(values, count, sizeof *values, by_value);
    return count % 2 ? values[count / 2] : (values[count / 2 - 1] + values[count / 2]) / 2;
}

static void die(const char *what) {
    fprintf(stderr, "tls_floor: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

/* Move everything pending in `from` into `to`. */
static void pipe_bio(BIO *from, BIO *to) {
    char buf[16384];
    int n;
    while ((n = BIO_read(from, buf, sizeof buf)) > 0)
        if (BIO_write(to, buf, n) != n)
            die("BIO_write");
}

/* One ticket key, through a key callback as in gateway/_tlsext.c (1: use, no renewal). */
static unsigned char key_name[16], key_aes[32], key_hmac[32];

static int ticket_key_cb(SSL *ssl, unsigned char name[16], unsigned char iv[EVP_MAX_IV_LENGTH],
                         EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx, int enc) {
    (void)ssl;
    OSSL_PARAM params[3];
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, key_hmac, 32);
    params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, "SHA256", 0);
    params[2] = OSSL_PARAM_construct_end();
    if (enc) {
        memcpy(name, key_name, sizeof key_name);
        if (RAND_bytes(iv, EVP_CIPHER_get_iv_length(EVP_aes_256_cbc())) != 1) return -1;
        return EVP_EncryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, key_aes, iv) == 1 &&
                       EVP_MAC_CTX_set_params(hctx, params) == 1
                   ? 1
                   : -1;
    }
    if (memcmp(name, key_name, sizeof key_name) != 0) return 0;
    return EVP_DecryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, key_aes, iv) == 1 &&
                   EVP_MAC_CTX_set_params(hctx, params) == 1
               ? 1
               : -1;
}

/* As the gateway's: a resumed handshake issues no new ticket (USE, not USE_RENEW). */
static SSL_TICKET_RETURN ticket_decrypted(SSL *ssl, SSL_SESSION *session,
                                          const unsigned char *keyname, size_t keyname_len,
                                          SSL_TICKET_STATUS status, void *arg) {
    (void)ssl, (void)session, (void)keyname, (void)keyname_len, (void)arg;
    if (status == SSL_TICKET_SUCCESS) return SSL_TICKET_RETURN_USE;
    if (status == SSL_TICKET_SUCCESS_RENEW) return SSL_TICKET_RETURN_USE_RENEW;
    if (status == SSL_TICKET_EMPTY || status == SSL_TICKET_NO_DECRYPT)
        return SSL_TICKET_RETURN_IGNORE_RENEW;
    return SSL_TICKET_RETURN_IGNORE;
}

static int stalled(SSL *ssl, int rc) {
    int err = SSL_get_error(ssl, rc);
    return err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE;
}

/* One handshake; returns the server's CPU seconds. The server SSL is kept in *held (or
 * freed when held is NULL); *session becomes the client's session after the ticket. */
static double handshake(SSL_CTX *sctx, SSL_CTX *cctx, SSL_SESSION **session, int *resumed,
                        SSL **held) {
    SSL *server = SSL_new(sctx), *client = SSL_new(cctx);
    BIO *s_in = BIO_new(BIO_s_mem()), *s_out = BIO_new(BIO_s_mem());
    BIO *c_in = BIO_new(BIO_s_mem()), *c_out = BIO_new(BIO_s_mem());
    if (!server || !client || !s_in || !s_out || !c_in || !c_out)
        die("out of memory");
    SSL_set_bio(server, s_in, s_out);
    SSL_set_bio(client, c_in, c_out);
    SSL_set_accept_state(server);
    SSL_set_connect_state(client);
    if (*session != NULL)
        SSL_set_session(client, *session);
    double spent = 0.0;
    int server_done = 0, client_done = 0;
    for (int step = 0; step < 8 && !(server_done && client_done); step++) {
        if (!client_done) {
            int rc = SSL_do_handshake(client);
            if (rc == 1)
                client_done = 1;
            else if (!stalled(client, rc))
                die("client handshake");
        }
        pipe_bio(c_out, s_in);
        if (!server_done) {
            double t = thread_cpu();
            int rc = SSL_do_handshake(server);
            spent += thread_cpu() - t;
            if (rc == 1)
                server_done = 1;
            else if (!stalled(server, rc))
                die("server handshake");
        }
        pipe_bio(s_out, c_in);
    }
    if (!(server_done && client_done))
        die("handshake did not finish");
    char byte;
    (void)SSL_read(client, &byte, 1); /* takes the ticket, if one came */
    *resumed += SSL_session_reused(server);
    SSL_SESSION *next = SSL_get1_session(client);
    if (next != NULL) {
        SSL_SESSION_free(*session);
        *session = next;
    }
    /* Closed cleanly: a client SSL freed mid-session marks its session not resumable. */
    SSL_set_shutdown(client, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
    SSL_free(client);
    if (held != NULL) {
        /* Idle: fresh empty BIOs (the old ones' buffers go) and no record buffers. */
        SSL_set_bio(server, BIO_new(BIO_s_mem()), BIO_new(BIO_s_mem()));
        SSL_free_buffers(server);
        *held = server;
    } else {
        SSL_free(server);
    }
    return spent;
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: tls_floor CA SERVER_CERT SERVER_KEY DEVICE_CERT DEVICE_KEY N "
                        "ROUNDS HOLD\n");
        return 2;
    }
    int n = atoi(argv[6]), rounds = atoi(argv[7]), hold = atoi(argv[8]);
    SSL_CTX *sctx = SSL_CTX_new(TLS_server_method());
    SSL_CTX *cctx = SSL_CTX_new(TLS_client_method());
    if (!sctx || !cctx)
        die("SSL_CTX_new");
    SSL_CTX_set_min_proto_version(sctx, TLS1_2_VERSION);
    SSL_CTX_set_options(sctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                                  SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_mode(sctx, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_session_cache_mode(sctx, SSL_SESS_CACHE_OFF); /* tickets carry sessions */
    SSL_CTX_set_session_id_context(sctx, (const unsigned char *)"tls_floor", 9);
    SSL_CTX_set_session_ticket_cb(sctx, NULL, ticket_decrypted, NULL);
    if (RAND_bytes(key_name, sizeof key_name) != 1 || RAND_bytes(key_aes, sizeof key_aes) != 1 ||
        RAND_bytes(key_hmac, sizeof key_hmac) != 1 ||
        !SSL_CTX_set_tlsext_ticket_key_evp_cb(sctx, ticket_key_cb))
        die("ticket keys");
    SSL_CTX_set_num_tickets(sctx, 1);
    SSL_CTX_set_verify(sctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    X509_VERIFY_PARAM_set_flags(SSL_CTX_get0_param(sctx), X509_V_FLAG_PARTIAL_CHAIN);
    if (SSL_CTX_load_verify_locations(sctx, argv[1], NULL) != 1 ||
        SSL_CTX_use_certificate_chain_file(sctx, argv[2]) != 1 ||
        SSL_CTX_use_PrivateKey_file(sctx, argv[3], SSL_FILETYPE_PEM) != 1)
        die("server credentials");
    SSL_CTX_set_verify(cctx, SSL_VERIFY_NONE, NULL);
    if (SSL_CTX_use_certificate_chain_file(cctx, argv[4]) != 1 ||
        SSL_CTX_use_PrivateKey_file(cctx, argv[5], SSL_FILETYPE_PEM) != 1)
        die("device credentials");

    SSL_SESSION *ticket = NULL;
    int resumed = 0;
    handshake(sctx, cctx, &ticket, &resumed, NULL); /* warm up; the first ticket */
    double *full = calloc(rounds + 1, sizeof *full), *again = calloc(rounds + 1, sizeof *again);
    if (full == NULL || again == NULL)
        die("out of memory");
    int resumed_total = 0;
    for (int r = 0; r < rounds; r++) {
        double spent = 0.0;
        for (int i = 0; i < n; i++) {
            SSL_SESSION *none = NULL;
            spent += handshake(sctx, cctx, &none, &resumed, NULL);
            SSL_SESSION_free(none);
        }
        full[r] = spent / n;
        spent = 0.0;
        resumed = 0;
        for (int i = 0; i < n; i++)
            spent += handshake(sctx, cctx, &ticket, &resumed, NULL);
        resumed_total += resumed;
        again[r] = spent / n;
    }
    double full_ms = median(full, rounds) * 1e3, again_ms = median(again, rounds) * 1e3;
    free(full);
    free(again);

    SSL **held = calloc(hold, sizeof *held);
    if (held == NULL)
        die("out of memory");
    malloc_trim(0);
    struct mallinfo2 before = mallinfo2();
    for (int i = 0; i < hold; i++) {
        SSL_SESSION *none = NULL;
        handshake(sctx, cctx, &none, &resumed, &held[i]);
        SSL_SESSION_free(none);
    }
    struct mallinfo2 after = mallinfo2();
    long per = hold ? (long)(after.uordblks - before.uordblks) / hold : 0;
    printf("%.4f %.4f %ld %d\n", full_ms, again_ms, per, resumed_total);
    for (int i = 0; i < hold; i++)
        SSL_free(held[i]);
    free(held);
    SSL_SESSION_free(ticket);
    SSL_CTX_free(sctx);
    SSL_CTX_free(cctx);
    return 0;
}
