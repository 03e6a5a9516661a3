/* Load generator for the chat server: MEMBERS connections join the room;
 * the first PUBLISHERS of them each keep WINDOW messages in flight (a new
 * one is sent when the publisher sees its own message come back), so the
 * offered load follows what the server delivers and nobody is evicted.
 * Counts room messages delivered to all members over DURATION seconds.
 *
 * usage: loadgen PORT MEMBERS PUBLISHERS TEXT_BYTES DURATION_S [WINDOW]
 * Talks only to 127.0.0.1.  Prints one line: key=value pairs. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF (1 << 20)

typedef struct {
    int fd;
    int joined;
    int inflight;
    char tag[32];
    size_t taglen;
    unsigned char *buf;
    size_t len;
} conn_t;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void send_all(int fd, const void *data, size_t n) {
    const char *p = data;
    while (n) {
        ssize_t w = send(fd, p, n, 0);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            perror("send");
            exit(1);
        }
        p += w;
        n -= (size_t)w;
    }
}

static void send_json(int fd, const char *json) {
    uint32_t len = htonl((uint32_t)strlen(json));
    char frame[70000];
    memcpy(frame, &len, 4);
    memcpy(frame + 4, json, strlen(json));
    send_all(fd, frame, 4 + strlen(json));
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s PORT MEMBERS PUBLISHERS TEXT_BYTES DURATION_S [WINDOW]\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]), members = atoi(argv[2]), publishers = atoi(argv[3]);
    int text_bytes = atoi(argv[4]);
    double duration = atof(argv[5]);
    int window = argc > 6 ? atoi(argv[6]) : 8;
    char say[8192];
    char *text = malloc((size_t)text_bytes + 1);
    memset(text, 'x', (size_t)text_bytes);
    text[text_bytes] = 0;
    snprintf(say, sizeof say, "{\"type\":\"say\",\"text\":\"%s\"}", text);

    int ep = epoll_create1(0);
    conn_t *c = calloc((size_t)members, sizeof *c);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    for (int i = 0; i < members; i++) {
        c[i].fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c[i].fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
            perror("connect");
            return 1;
        }
        int one = 1;
        setsockopt(c[i].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        char hello[128];
        snprintf(hello, sizeof hello, "{\"type\":\"hello\",\"name\":\"m%d\"}", i);
        send_json(c[i].fd, hello);
        c[i].taglen = (size_t)snprintf(c[i].tag, sizeof c[i].tag, "\"from\":\"m%d@", i);
        c[i].buf = malloc(BUF);
        fcntl(c[i].fd, F_SETFL, O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c[i].fd, &ev);
    }
    long long delivered = 0, counted = 0, joined = 0, bytes = 0;
    double start = 0, t0 = now(), end_at = 0;
    struct epoll_event evs[256];
    for (;;) {
        double t = now();
        if (!start && t - t0 > 60) { fprintf(stderr, "join timed out\n"); return 1; }
        if (start && t >= end_at) break;
        int n = epoll_wait(ep, evs, 256, 100);
        for (int k = 0; k < n; k++) {
            conn_t *x = &c[evs[k].data.u32];
            ssize_t r = recv(x->fd, x->buf + x->len, BUF - x->len, 0);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN) continue;
                fprintf(stderr, "member %u disconnected\n", evs[k].data.u32);
                return 1;
            }
            if (start) bytes += r;
            x->len += (size_t)r;
            size_t off = 0;
            while (x->len - off >= 4) {
                uint32_t flen;
                memcpy(&flen, x->buf + off, 4);
                flen = ntohl(flen);
                if (x->len - off - 4 < flen) break;
                unsigned char *p = x->buf + off + 4;
                if (flen > 17 && memcmp(p, "{\"type\":\"message\"", 17) == 0) {
                    delivered++;
                    if (start) counted++;
                    if (x->inflight && memmem(p, flen, x->tag, x->taglen)) x->inflight--;
                } else if (!x->joined && flen > 17 && memcmp(p, "{\"type\":\"welcome\"", 17) == 0) {
                    x->joined = 1;
                    if (++joined == members) {
                        start = now();
                        end_at = start + duration;
                    }
                }
                off += 4 + flen;
            }
            memmove(x->buf, x->buf + off, x->len - off);
            x->len -= off;
        }
        if (joined == members) {
            for (int i = 0; i < publishers; i++)
                while (c[i].inflight < window) {
                    send_json(c[i].fd, say);
                    c[i].inflight++;
                }
        }
    }
    double elapsed = now() - start;
    printf("members=%d publishers=%d text_bytes=%d window=%d seconds=%.2f deliveries=%lld "
           "deliveries_per_s=%.0f MB_per_s=%.1f\n",
           members, publishers, text_bytes, window, elapsed, counted, counted / elapsed,
           bytes / elapsed / 1e6);
    (void)delivered;
    return 0;
}
