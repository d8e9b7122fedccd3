/* The handshake load generator of bench/mqtt_gateway.py, in C.
 *
 * Each device (one line of the devices file: certificate, key, client id) runs one loop:
 * TCP connect, TLS handshake with the device's certificate, MQTT 3.1.1 CONNECT, wait for a
 * CONNACK with return code 0, DISCONNECT, close; then again, until the time is up. All
 * loops share one epoll loop over non-blocking sockets. It is the same work as the Python
 * generator (`handshake_worker`), without the interpreter: on a 2-core machine the load
 * generator competes with the servers under test for the CPU, so the less it takes, the
 * more the figures say about the servers. Like the Python one it does not verify the
 * server's certificate (the servers' own work is unchanged: they send and prove their
 * certificate and verify the device's) and resumes no session: every handshake is full.
 *
 * Usage: handshake PORT SECONDS DEVICES_FILE
 * Prints: "<done> <failed> <cpu seconds>" on stdout. An attempt that has not finished
 * 10 s after it started counts as failed.
 *
 * Build: cc -O2 -o handshake handshake.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_DEVICES 1024
#define ATTEMPT_TIMEOUT 10.0

enum phase { TCP_CONNECTING, HANDSHAKING, AWAIT_CONNACK };

struct slot {
    SSL_CTX *ctx;
    unsigned char connect[300]; /* the CONNECT packet of this device's client id */
    size_t connect_len;
    SSL *ssl;
    int fd;
    enum phase phase;
    unsigned char buf[4];
    size_t got;
    double started;
};

static struct sockaddr_in server;
static long done, failed;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static size_t connect_packet(unsigned char *out, const char *client_id) {
    size_t id_len = strlen(client_id);
    size_t body = 10 + 2 + id_len; /* variable header + client id */
    size_t n = 0;
    out[n++] = 0x10;
    out[n++] = (unsigned char)body; /* client ids here are short: one length byte */
    static const unsigned char header[] = {0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0x02, 0x58};
    memcpy(out + n, header, sizeof header); /* protocol 4, clean session, keepalive 600 */
    n += sizeof header;
    out[n++] = (unsigned char)(id_len >> 8);
    out[n++] = (unsigned char)(id_len & 0xff);
    memcpy(out + n, client_id, id_len);
    return n + id_len;
}

static void arm(int epfd, struct slot *s, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = s};
    epoll_ctl(epfd, op, s->fd, &ev);
}

static int start(int epfd, struct slot *s) {
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (s->fd < 0)
        return -1;
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    s->started = now();
    s->got = 0;
    s->ssl = NULL;
    if (connect(s->fd, (struct sockaddr *)&server, sizeof server) < 0 && errno != EINPROGRESS) {
        close(s->fd);
        s->fd = -1;
        return -1;
    }
    s->phase = TCP_CONNECTING;
    arm(epfd, s, EPOLLOUT, EPOLL_CTL_ADD);
    return 0;
}

static void finish(int epfd, struct slot *s, int ok) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, s->fd, NULL);
    if (s->ssl != NULL)
        SSL_free(s->ssl); /* no close_notify, as the Python generator: just close */
    close(s->fd);
    s->ssl = NULL;
    s->fd = -1;
    if (ok)
        done++;
    else
        failed++;
}

/* Advance one attempt: 1 done, 0 failed, -1 not yet. */
static int step(int epfd, struct slot *s) {
    if (s->phase == TCP_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0)
            return 0;
        s->ssl = SSL_new(s->ctx);
        SSL_set_fd(s->ssl, s->fd);
        SSL_set_connect_state(s->ssl);
        s->phase = HANDSHAKING;
    }
    for (;;) {
        int rc;
        if (s->phase == HANDSHAKING) {
            rc = SSL_do_handshake(s->ssl);
            if (rc == 1) {
                if (SSL_write(s->ssl, s->connect, (int)s->connect_len) <= 0)
                    return 0;
                s->phase = AWAIT_CONNACK;
                continue;
            }
        } else {
            rc = SSL_read(s->ssl, s->buf + s->got, (int)(sizeof s->buf - s->got));
            if (rc > 0) {
                s->got += (size_t)rc;
                if (s->got < sizeof s->buf)
                    continue;
                if (s->buf[0] != 0x20 || s->buf[3] != 0)
                    return 0;
                static const unsigned char disconnect[] = {0xe0, 0x00};
                SSL_write(s->ssl, disconnect, sizeof disconnect);
                return 1;
            }
        }
        switch (SSL_get_error(s->ssl, rc)) {
        case SSL_ERROR_WANT_READ:
            arm(epfd, s, EPOLLIN, EPOLL_CTL_MOD);
            return -1;
        case SSL_ERROR_WANT_WRITE:
            arm(epfd, s, EPOLLOUT, EPOLL_CTL_MOD);
            return -1;
        default:
            ERR_clear_error();
            return 0;
        }
    }
}

static SSL_CTX *device_context(const char *cert, const char *key) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL || !SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) ||
        SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        ERR_print_errors_fp(stderr);
        exit(2);
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    return ctx;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PORT SECONDS DEVICES_FILE\n", argv[0]);
        return 2;
    }
    server.sin_family = AF_INET;
    server.sin_port = htons((uint16_t)atoi(argv[1]));
    server.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    double seconds = atof(argv[2]);

    static struct slot slots[MAX_DEVICES];
    int count = 0;
    FILE *list = fopen(argv[3], "r");
    if (list == NULL) {
        perror(argv[3]);
        return 2;
    }
    char cert[1024], key[1024], client_id[200];
    while (count < MAX_DEVICES && fscanf(list, "%1023s %1023s %199s", cert, key, client_id) == 3) {
        if (strlen(client_id) > 100) {
            fprintf(stderr, "client id too long: %s\n", client_id);
            return 2;
        }
        slots[count].ctx = device_context(cert, key);
        slots[count].connect_len = connect_packet(slots[count].connect, client_id);
        count++;
    }
    fclose(list);
    if (count == 0) {
        fprintf(stderr, "no devices in %s\n", argv[3]);
        return 2;
    }

    int epfd = epoll_create1(0);
    double deadline = now() + seconds;
    int live = 0;
    for (int i = 0; i < count; i++) {
        if (start(epfd, &slots[i]) == 0)
            live++;
        else
            failed++;
    }
    struct epoll_event events[MAX_DEVICES];
    double swept = now();
    while (live > 0) {
        int n = epoll_wait(epfd, events, MAX_DEVICES, 500);
        double t = now();
        if (t > deadline + ATTEMPT_TIMEOUT)
            break;
        for (int i = 0; i < n; i++) {
            struct slot *s = events[i].data.ptr;
            int result = step(epfd, s);
            if (result < 0)
                continue;
            finish(epfd, s, result);
            live--;
            if (now() < deadline) {
                if (start(epfd, s) == 0)
                    live++;
                else
                    failed++;
            }
        }
        if (t - swept < 1)
            continue;
        swept = t;
        for (int i = 0; i < count; i++) { /* stuck attempts: count them and move on */
            struct slot *s = &slots[i];
            if (s->fd >= 0 && t - s->started > ATTEMPT_TIMEOUT) {
                finish(epfd, s, 0);
                live--;
                if (t < deadline && start(epfd, s) == 0)
                    live++;
            }
        }
    }
    for (int i = 0; i < count; i++)
        if (slots[i].fd >= 0)
            finish(epfd, &slots[i], 0);
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    double cpu = usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 + usage.ru_stime.tv_sec +
                 usage.ru_stime.tv_usec / 1e6;
    printf("%ld %ld %.3f\n", done, failed, cpu);
    return 0;
}
