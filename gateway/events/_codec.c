/* The C accelerator of gateway/events/codec.py: `encode_event`'s common case.
 *
 * encode(values, chain_id, seq, prev_digest) takes an AuthEvent's field dict (the model's
 * __dict__) and returns (spool payload, sha256 digest, COPY row) exactly as the Python
 * path does, or None for what it leaves to Python: a time that is not in UTC or before
 * the year 1000, a NUL or a lone surrogate in a string (Python raises the error), a float
 * or any other value in `detail` that is not a str, int, bool, None, dict or list.
 *
 * The canonical JSON is json.dumps(sort_keys=True, separators=(",", ":"),
 * ensure_ascii=False).encode() of the chained fields: keys sorted by code point, strings
 * escaped as CPython's json does (\" \\ \b \f \n \r \t, other controls as \u00xx), the
 * rest of UTF-8 as is. tests/events/test_event_codec.py compares both paths.
 *
 * Why C: this is the sink's hot path (once per event, on the event loop's thread). In
 * Python it was most of the sink's CPU per event; here it is a few hundred nanoseconds
 * plus the SHA-256, which goes through hashlib (the interpreter's own OpenSSL).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <stdint.h>
#include <string.h>

#define NOT_HANDLED 1 /* returned by the writers: leave this event to the Python path */
#define DETAIL_DEPTH 32

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
    char stack[2048];
} Buffer;

static PyObject *sha256; /* hashlib.sha256 */
static PyObject *str_digest, *str_int;
static PyObject *key_id, *key_time, *key_instance, *key_type, *key_outcome, *key_reason,
    *key_device_id, *key_fleet, *key_cert_serial, *key_cert_fingerprint, *key_client_id,
    *key_peer_address, *key_tls_version, *key_tls_cipher, *key_detail;

static const char HEX[] = "0123456789abcdef";

static void buffer_init(Buffer *b) {
    b->data = b->stack;
    b->len = 0;
    b->cap = sizeof b->stack;
}

static void buffer_free(Buffer *b) {
    if (b->data != b->stack) PyMem_Free(b->data);
}

static int buffer_reserve(Buffer *b, Py_ssize_t extra) {
    if (b->len + extra <= b->cap) return 0;
    Py_ssize_t cap = b->cap;
    while (cap < b->len + extra) cap *= 2;
    char *data = PyMem_Malloc((size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(data, b->data, (size_t)b->len);
    buffer_free(b);
    b->data = data;
    b->cap = cap;
    return 0;
}

static int put(Buffer *b, const char *text, Py_ssize_t size) {
    if (buffer_reserve(b, size) < 0) return -1;
    memcpy(b->data + b->len, text, (size_t)size);
    b->len += size;
    return 0;
}

#define PUT_LITERAL(b, text) put((b), (text), (Py_ssize_t)(sizeof(text) - 1))

/* A JSON string as CPython's json writes it with ensure_ascii=False. */
static int put_string(Buffer *b, PyObject *text) {
    Py_ssize_t size;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, &size);
    if (utf8 == NULL) { /* a lone surrogate: Python's .encode() raises the error */
        PyErr_Clear();
        return NOT_HANDLED;
    }
    if (size > (PY_SSIZE_T_MAX - b->len - 2) / 6) {
        PyErr_NoMemory();
        return -1;
    }
    if (buffer_reserve(b, 6 * size + 2) < 0) return -1; /* worst case: every byte \u00xx */
    char *out = b->data + b->len;
    *out++ = '"';
    for (Py_ssize_t i = 0; i < size; i++) {
        unsigned char c = (unsigned char)utf8[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *out++ = (char)c;
            continue;
        }
        *out++ = '\\';
        switch (c) {
        case '"': *out++ = '"'; break;
        case '\\': *out++ = '\\'; break;
        case '\b': *out++ = 'b'; break;
        case '\f': *out++ = 'f'; break;
        case '\n': *out++ = 'n'; break;
        case '\r': *out++ = 'r'; break;
        case '\t': *out++ = 't'; break;
        case 0: return NOT_HANDLED; /* PostgreSQL text cannot hold NUL: Python raises */
        default:
            memcpy(out, "u00", 3);
            out[3] = HEX[c >> 4];
            out[4] = HEX[c & 0xF];
            out += 5;
        }
    }
    *out++ = '"';
    b->len = out - b->data;
    return 0;
}

static int put_optional_string(Buffer *b, PyObject *text) {
    if (text == Py_None) return PUT_LITERAL(b, "null");
    if (!PyUnicode_Check(text)) return NOT_HANDLED;
    return put_string(b, text);
}

static int put_json(Buffer *b, PyObject *value, int depth);

static int put_object(Buffer *b, PyObject *dict, int depth) {
    PyObject *keys = PyDict_Keys(dict);
    if (keys == NULL) return -1;
    Py_ssize_t count = PyList_GET_SIZE(keys);
    int status = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!PyUnicode_CheckExact(PyList_GET_ITEM(keys, i))) {
            status = NOT_HANDLED; /* json converts other keys to text first */
            goto done;
        }
    }
    if (PyList_Sort(keys) < 0) {
        status = -1;
        goto done;
    }
    if ((status = PUT_LITERAL(b, "{")) != 0) goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        if (i > 0 && (status = PUT_LITERAL(b, ",")) != 0) goto done;
        if ((status = put_string(b, key)) != 0) goto done;
        if ((status = PUT_LITERAL(b, ":")) != 0) goto done;
        PyObject *item = PyDict_GetItemWithError(dict, key);
        if (item == NULL) {
            status = PyErr_Occurred() ? -1 : NOT_HANDLED;
            goto done;
        }
        if ((status = put_json(b, item, depth + 1)) != 0) goto done;
    }
    status = PUT_LITERAL(b, "}");
done:
    Py_DECREF(keys);
    return status;
}

static int put_array(Buffer *b, PyObject *sequence, int depth) {
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    PyObject **items = PySequence_Fast_ITEMS(sequence);
    int status;
    if ((status = PUT_LITERAL(b, "[")) != 0) return status;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (i > 0 && (status = PUT_LITERAL(b, ",")) != 0) return status;
        if ((status = put_json(b, items[i], depth + 1)) != 0) return status;
    }
    return PUT_LITERAL(b, "]");
}

static int put_json(Buffer *b, PyObject *value, int depth) {
    if (depth > DETAIL_DEPTH) return NOT_HANDLED;
    if (value == Py_None) return PUT_LITERAL(b, "null");
    if (value == Py_True) return PUT_LITERAL(b, "true");
    if (value == Py_False) return PUT_LITERAL(b, "false");
    if (PyUnicode_Check(value)) return put_string(b, value);
    if (PyLong_Check(value)) { /* int subclasses too: json writes int.__repr__ */
        PyObject *text = PyLong_Type.tp_repr(value);
        if (text == NULL) return -1;
        Py_ssize_t size;
        const char *digits = PyUnicode_AsUTF8AndSize(text, &size);
        int status = digits == NULL ? -1 : put(b, digits, size);
        Py_DECREF(text);
        return status;
    }
    if (PyDict_Check(value)) return put_object(b, value, depth);
    if (PyList_Check(value) || PyTuple_Check(value)) return put_array(b, value, depth);
    return NOT_HANDLED; /* floats (repr rules), anything json would call default() for */
}

/* ``value`` as exactly ``width`` decimal digits (it is below 10**width). */
static void put_digits(char *out, int width, int value) {
    for (int i = width - 1; i >= 0; i--, value /= 10) out[i] = (char)('0' + value % 10);
}

/* `key` from the field dict, borrowed; NULL with no exception set when it is missing. */
static PyObject *field(PyObject *values, PyObject *key) {
    return PyDict_GetItemWithError(values, key);
}

static PyObject *hex_text(const unsigned char *bytes, Py_ssize_t size) {
    PyObject *text = PyUnicode_New(2 * size, 127);
    if (text == NULL) return NULL;
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(text);
    for (Py_ssize_t i = 0; i < size; i++) {
        out[2 * i] = (Py_UCS1)HEX[bytes[i] >> 4];
        out[2 * i + 1] = (Py_UCS1)HEX[bytes[i] & 0xF];
    }
    return text;
}

/* The 16 bytes of a uuid.UUID (its `int`), big-endian. */
static int uuid_bytes(PyObject *uuid, unsigned char out[16]) {
    PyObject *number = PyObject_GetAttr(uuid, str_int);
    if (number == NULL) { /* not a uuid.UUID: Python's str() of it decides */
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear();
        return NOT_HANDLED;
    }
    int status = -1;
    if (PyLong_Check(number)) {
#if PY_VERSION_HEX >= 0x030D0000
        Py_ssize_t written = PyLong_AsNativeBytes(
            number, out, 16, Py_ASNATIVEBYTES_BIG_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER);
        status = written < 0 ? -1 : (written > 16 ? NOT_HANDLED : 0);
#else
        status = _PyLong_AsByteArray((PyLongObject *)number, out, 16, 0, 0);
#endif
    } else {
        status = NOT_HANDLED;
    }
    Py_DECREF(number);
    return status;
}

/* Text of a str subclass (an enum member) as an exact str; new reference. */
static PyObject *exact_text(PyObject *text) {
    if (PyUnicode_CheckExact(text)) {
        Py_INCREF(text);
        return text;
    }
    return PyObject_Str(text);
}

static PyObject *encode(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyDict_Check(args[0]) || !PyUnicode_Check(args[1]) ||
        !PyLong_Check(args[2]) || !PyBytes_Check(args[3]) || PyBytes_GET_SIZE(args[3]) != 32) {
        PyErr_SetString(PyExc_TypeError,
                        "encode(values: dict, chain_id: str, seq: int, prev_digest: bytes[32])");
        return NULL;
    }
    PyObject *values = args[0], *chain_id = args[1], *seq = args[2], *prev = args[3];
    PyObject *id = field(values, key_id), *moment = field(values, key_time);
    PyObject *instance = field(values, key_instance), *type = field(values, key_type);
    PyObject *outcome = field(values, key_outcome), *reason = field(values, key_reason);
    PyObject *device_id = field(values, key_device_id), *fleet = field(values, key_fleet);
    PyObject *cert_serial = field(values, key_cert_serial);
    PyObject *cert_fingerprint = field(values, key_cert_fingerprint);
    PyObject *client_id = field(values, key_client_id);
    PyObject *peer_address = field(values, key_peer_address);
    PyObject *tls_version = field(values, key_tls_version);
    PyObject *tls_cipher = field(values, key_tls_cipher), *detail = field(values, key_detail);
    if (PyErr_Occurred()) return NULL;
    if (!id || !moment || !instance || !type || !outcome || !reason || !device_id || !fleet ||
        !cert_serial || !cert_fingerprint || !client_id || !peer_address || !tls_version ||
        !tls_cipher || !detail || !PyDateTime_Check(moment) || !PyDict_Check(detail) ||
        !PyUnicode_Check(instance) || !PyUnicode_Check(type) || !PyUnicode_Check(outcome) ||
        !PyUnicode_Check(reason))
        Py_RETURN_NONE;
    if (PyDateTime_DATE_GET_TZINFO(moment) != PyDateTime_TimeZone_UTC ||
        PyDateTime_GET_YEAR(moment) < 1000)
        Py_RETURN_NONE;
    long long seq_value = PyLong_AsLongLong(seq);
    if (seq_value == -1 && PyErr_Occurred()) { /* beyond 64 bits: Python writes it */
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }

    unsigned char id_bytes[16];
    int status = uuid_bytes(id, id_bytes);
    if (status < 0) return NULL;
    if (status == NOT_HANDLED) Py_RETURN_NONE;
    char id_text[36];
    for (int i = 0, o = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) id_text[o++] = '-';
        id_text[o++] = HEX[id_bytes[i] >> 4];
        id_text[o++] = HEX[id_bytes[i] & 0xF];
    }
    char stamp[] = "YYYY-MM-DDTHH:MM:SS.ffffffZ"; /* as schemas.events writes it */
    put_digits(stamp, 4, PyDateTime_GET_YEAR(moment));
    put_digits(stamp + 5, 2, PyDateTime_GET_MONTH(moment));
    put_digits(stamp + 8, 2, PyDateTime_GET_DAY(moment));
    put_digits(stamp + 11, 2, PyDateTime_DATE_GET_HOUR(moment));
    put_digits(stamp + 14, 2, PyDateTime_DATE_GET_MINUTE(moment));
    put_digits(stamp + 17, 2, PyDateTime_DATE_GET_SECOND(moment));
    put_digits(stamp + 20, 6, PyDateTime_DATE_GET_MICROSECOND(moment));
    char seq_text[24];
    int seq_size = snprintf(seq_text, sizeof seq_text, "%lld", seq_value);

    /* The payload is prev_digest || digest || canonical JSON; the JSON is written after a
     * 64-byte gap and prev_digest just before it, so the hashed input (prev_digest ||
     * JSON) is one contiguous span. */
    Buffer b;
    buffer_init(&b);
    PyObject *payload = NULL, *digest = NULL, *row = NULL, *detail_text = NULL;
    Py_ssize_t detail_start, detail_end;
    b.len = 64;
#define STEP(call)                                                                           \
    do {                                                                                     \
        if ((status = (call)) != 0) goto finish;                                             \
    } while (0)
    STEP(PUT_LITERAL(&b, "{\"cert_fingerprint\":"));
    STEP(put_optional_string(&b, cert_fingerprint));
    STEP(PUT_LITERAL(&b, ",\"cert_serial\":"));
    STEP(put_optional_string(&b, cert_serial));
    STEP(PUT_LITERAL(&b, ",\"chain_id\":"));
    STEP(put_string(&b, chain_id));
    STEP(PUT_LITERAL(&b, ",\"client_id\":"));
    STEP(put_optional_string(&b, client_id));
    STEP(PUT_LITERAL(&b, ",\"detail\":"));
    detail_start = b.len;
    STEP(put_object(&b, detail, 0));
    detail_end = b.len;
    STEP(PUT_LITERAL(&b, ",\"device_id\":"));
    STEP(put_optional_string(&b, device_id));
    STEP(PUT_LITERAL(&b, ",\"fleet\":"));
    STEP(put_optional_string(&b, fleet));
    STEP(PUT_LITERAL(&b, ",\"id\":\""));
    STEP(put(&b, id_text, 36));
    STEP(PUT_LITERAL(&b, "\",\"instance\":"));
    STEP(put_string(&b, instance));
    STEP(PUT_LITERAL(&b, ",\"outcome\":"));
    STEP(put_string(&b, outcome));
    STEP(PUT_LITERAL(&b, ",\"peer_address\":"));
    STEP(put_optional_string(&b, peer_address));
    STEP(PUT_LITERAL(&b, ",\"reason\":"));
    STEP(put_string(&b, reason));
    STEP(PUT_LITERAL(&b, ",\"seq\":"));
    STEP(put(&b, seq_text, seq_size));
    STEP(PUT_LITERAL(&b, ",\"time\":\""));
    STEP(put(&b, stamp, (Py_ssize_t)(sizeof stamp - 1)));
    STEP(PUT_LITERAL(&b, "\",\"tls_cipher\":"));
    STEP(put_optional_string(&b, tls_cipher));
    STEP(PUT_LITERAL(&b, ",\"tls_version\":"));
    STEP(put_optional_string(&b, tls_version));
    STEP(PUT_LITERAL(&b, ",\"type\":"));
    STEP(put_string(&b, type));
    STEP(PUT_LITERAL(&b, "}"));
#undef STEP

    memcpy(b.data + 32, PyBytes_AS_STRING(prev), 32);
    PyObject *span = PyMemoryView_FromMemory(b.data + 32, b.len - 32, PyBUF_READ);
    if (span == NULL) goto fail;
    PyObject *hasher = PyObject_CallOneArg(sha256, span);
    Py_DECREF(span);
    if (hasher == NULL) goto fail;
    digest = PyObject_CallMethodNoArgs(hasher, str_digest);
    Py_DECREF(hasher);
    if (digest == NULL) goto fail;
    if (!PyBytes_Check(digest) || PyBytes_GET_SIZE(digest) != 32) {
        PyErr_SetString(PyExc_RuntimeError, "sha256 digest is not 32 bytes");
        goto fail;
    }
    memcpy(b.data, PyBytes_AS_STRING(prev), 32);
    memcpy(b.data + 32, PyBytes_AS_STRING(digest), 32);
    payload = PyBytes_FromStringAndSize(b.data, b.len);
    if (payload == NULL) goto fail;
    detail_text = PyUnicode_DecodeUTF8(b.data + detail_start, detail_end - detail_start, NULL);
    if (detail_text == NULL) goto fail;

    row = PyTuple_New(19);
    if (row == NULL) goto fail;
    PyObject *items[19] = {
        PyUnicode_FromStringAndSize(id_text, 36),
        Py_NewRef(moment),
        Py_NewRef(instance),
        exact_text(type),
        exact_text(outcome),
        exact_text(reason),
        Py_NewRef(device_id),
        Py_NewRef(fleet),
        Py_NewRef(cert_serial),
        Py_NewRef(cert_fingerprint),
        Py_NewRef(client_id),
        Py_NewRef(peer_address),
        Py_NewRef(tls_version),
        Py_NewRef(tls_cipher),
        Py_NewRef(detail_text),
        Py_NewRef(chain_id),
        Py_NewRef(seq),
        hex_text((const unsigned char *)PyBytes_AS_STRING(prev), 32),
        hex_text((const unsigned char *)PyBytes_AS_STRING(digest), 32),
    };
    int missing = 0;
    for (int i = 0; i < 19; i++) {
        if (items[i] == NULL) missing = 1;
        PyTuple_SET_ITEM(row, i, items[i]); /* steals; NULL slots are skipped by dealloc */
    }
    if (missing) goto fail;
    PyObject *result = PyTuple_New(3);
    if (result == NULL) goto fail;
    PyTuple_SET_ITEM(result, 0, payload);
    PyTuple_SET_ITEM(result, 1, digest);
    PyTuple_SET_ITEM(result, 2, row);
    Py_DECREF(detail_text);
    buffer_free(&b);
    return result;

finish: /* a writer stopped: an error (status < 0) or an event left to Python */
    buffer_free(&b);
    if (status < 0) return NULL;
    Py_RETURN_NONE;
fail:
    buffer_free(&b);
    Py_XDECREF(payload);
    Py_XDECREF(digest);
    Py_XDECREF(row);
    Py_XDECREF(detail_text);
    return NULL;
}

static PyMethodDef methods[] = {
    {"encode", (PyCFunction)(void (*)(void))encode, METH_FASTCALL,
     "encode(values, chain_id, seq, prev_digest) -> (payload, digest, row) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gateway.events._codec",
    .m_doc = "C accelerator of gateway.events.codec.encode_event.",
    .m_size = -1,
    .m_methods = methods,
};

#define INTERN(var, text)                                                                    \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC PyInit__codec(void) {
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL) return NULL;
    PyObject *hashlib = PyImport_ImportModule("hashlib");
    if (hashlib == NULL) return NULL;
    sha256 = PyObject_GetAttrString(hashlib, "sha256");
    Py_DECREF(hashlib);
    if (sha256 == NULL) return NULL;
    INTERN(str_digest, "digest");
    INTERN(str_int, "int");
    INTERN(key_id, "id");
    INTERN(key_time, "time");
    INTERN(key_instance, "instance");
    INTERN(key_type, "type");
    INTERN(key_outcome, "outcome");
    INTERN(key_reason, "reason");
    INTERN(key_device_id, "device_id");
    INTERN(key_fleet, "fleet");
    INTERN(key_cert_serial, "cert_serial");
    INTERN(key_cert_fingerprint, "cert_fingerprint");
    INTERN(key_client_id, "client_id");
    INTERN(key_peer_address, "peer_address");
    INTERN(key_tls_version, "tls_version");
    INTERN(key_tls_cipher, "tls_cipher");
    INTERN(key_detail, "detail");
    return PyModule_Create(&module_def);
}
