/* Load generator for the chat server and, for comparison, Redis pub/sub.
 *
 * usage: loadgen MODE PROTO PORT MEMBERS [key=value ...]
 *   MODE  throughput  seat MEMBERS, then PUBLISHERS each keep WINDOW
 *                     messages in flight for SECONDS; deliveries/s
 *         storm       connect all MEMBERS at once; time until all are
 *                     welcomed, then until all hear one probe message
 *         hold        seat MEMBERS, print "seated", stay silent (answering
 *                     pings) until stdin closes or TIMEOUT
 *         restart     seat MEMBERS, print "seated", publish until the server
 *                     drops everyone; reconnect with the terminal client's
 *                     backoff, rejoin, fill the gap with history after the
 *                     last seq seen (and history before for what that reply
 *                     reports missed); time until all are back
 *   PROTO chat        the chat server's framed JSON (tcpserver/PROTOCOL.md)
 *         redis       RESP: members SUBSCRIBE, separate connections PUBLISH
 *   keys  publishers=100 bytes=100 seconds=10 window=1 timeout=120 sync=0
 *         drain=10 (seconds to wait, after publishing, for what was sent)
 *         count=0 (throughput: stop once this many were published; 0: no limit)
 *         backoff=0.5 (restart: first reconnect delay, doubling to 15 s, +-20%)
 *         port2=0 (chat: odd-numbered members connect to this port instead,
 *         a second node of the same room; publishers are members, so half
 *         publish through each node)
 *         rate=0 (throughput: publish this many messages per second in
 *         total, on a fixed schedule, publishers in turn, whatever is in
 *         flight; each text carries its send time and every delivery's
 *         latency is recorded: the result adds p50_ms, p99_ms, max_ms)
 *         (sync=1: after "seated", wait for a line on stdin before
 *         publishing, so the runner can sample the server's memory)
 *
 * Publisher i is paired with member i: it sends a new message when member i
 * receives i's previous one, so the offered load follows what the server
 * delivers, for both protocols alike.  After the timed phase publishing
 * stops and everything sent is drained (bounded), so lost = published x
 * members - delivered is exact; chat members also check seq continuity.
 * Talks only to 127.0.0.1.  Prints key=value lines; exits 1 on a hard fault.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { S_WAIT, S_CONNECTING, S_JOINING, S_JOINED, S_GONE };
/* restart phases of a member after its connection dropped */
enum { R_LIVE, R_WELCOME, R_HISTORY, R_FRAMES, R_BACK };

typedef struct {
    int fd, state, phase, inflight, probe, new_epoch, paging;
    double retry_at, backoff, back_at;
    long long last_seq, resume_from, hist_left, hist_next, live_max, top;
    long long page_left, page_before; /* restart: missed events still to page in */
    char epoch[40];
    unsigned char *buf;
    size_t len, cap;
} conn_t;

static conn_t *m, *pub;              /* members; redis publishers */
static int N, P, chat, port, port2, ep;
static double rate;                  /* paced publishing, messages/s; 0: window */
static double *lat;                  /* paced: latency of every delivery, seconds */
static size_t lat_n, lat_cap;
static const char *mode;
static int text_bytes = 100, window = 1, sync_start = 0;
static long long max_published; /* throughput: stop publishing after this many */
static double seconds = 10, timeout_s = 120, drain_s = 10;
static long long published, delivered, counted, bytes_in, gaps, missed, dups;
static long long disconnects, refused, attempts, joined, back, epoch_changed, paged, unfilled;
/* restart: the terminal client's reconnect backoff (tcpserver/client.py) */
static double backoff_first = 0.5, backoff_max = 15, backoff_jitter = 0.2;
static int publishing, dropped;     /* restart: has the server gone yet */
static double t_dropped;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) { perror(what); exit(1); }

/* Small frames on a fresh socket: a short busy wait on EAGAIN is enough. */
static int send_all(int fd, const void *data, size_t n) {
    const char *p = data;
    double give_up = now() + 10;
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if ((errno == EAGAIN || errno == EINTR) && now() < give_up) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int send_json(int fd, const char *json) {
    size_t n = strlen(json);
    unsigned char frame[16384];
    uint32_t len = htonl((uint32_t)n);
    memcpy(frame, &len, 4);
    memcpy(frame + 4, json, n);
    return send_all(fd, frame, 4 + n);
}

static int send_resp(int fd, int argc, const char **argv) {
    char out[16384];
    size_t o = (size_t)snprintf(out, sizeof out, "*%d\r\n", argc);
    for (int i = 0; i < argc; i++)
        o += (size_t)snprintf(out + o, sizeof out - o, "$%zu\r\n%s\r\n", strlen(argv[i]), argv[i]);
    return send_all(fd, out, o);
}

static void open_conn(int idx) {
    conn_t *c = idx < N ? &m[idx] : &pub[idx - N];
    int to = port2 && idx < N && idx % 2 ? port2 : port;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)to)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS)
        die("connect");
    c->state = S_CONNECTING;
    c->len = 0;
    attempts++;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
}

/* The connection is gone: in restart mode schedule a reconnect. */
static void lost_conn(int idx) {
    conn_t *c = idx < N ? &m[idx] : &pub[idx - N];
    close(c->fd);
    c->fd = -1;
    c->inflight = 0;
    if (!dropped && strcmp(mode, "restart") == 0 && c->state == S_JOINED) {
        dropped = 1;
        t_dropped = now();
    }
    if (strcmp(mode, "restart") == 0 && dropped) {
        if (idx < N && c->phase == R_LIVE) {
            c->phase = R_WELCOME;
            c->paging = 0;
            c->resume_from = c->last_seq;
        } else if (idx < N && c->phase != R_BACK) {
            c->phase = R_WELCOME; /* dropped again mid-rejoin: start over */
            c->paging = 0;
        }
        c->backoff = c->backoff ? (c->backoff * 2 > backoff_max ? backoff_max : c->backoff * 2)
                                : backoff_first;
        double jitter = 1 - backoff_jitter + 2 * backoff_jitter * rand() / (double)RAND_MAX;
        c->retry_at = now() + c->backoff * jitter;
        c->state = S_WAIT;
    } else {
        c->state = S_GONE;
        disconnects++;
    }
}

static void joined_now(conn_t *c) {
    c->state = S_JOINED;
    c->backoff = 0;
    joined++;
}

static void on_connected(int idx) {
    conn_t *c = idx < N ? &m[idx] : &pub[idx - N];
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        if (err == ECONNREFUSED) refused++;
        errno = err;
        lost_conn(idx);
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)idx};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->state = S_JOINING;
    int rc = 0;
    if (idx >= N) {
        joined_now(c); /* a redis publisher needs no handshake */
    } else if (chat) {
        char hello[128];
        snprintf(hello, sizeof hello, "{\"type\":\"hello\",\"name\":\"m%d\"}", idx);
        rc = send_json(c->fd, hello);
    } else {
        const char *argv[] = {"SUBSCRIBE", "room"};
        rc = send_resp(c->fd, 2, argv);
    }
    if (rc < 0) lost_conn(idx);
}

static long long field_int(const unsigned char *p, size_t n, const char *key) {
    const unsigned char *f = memmem(p, n, key, strlen(key));
    return f ? strtoll((const char *)f + strlen(key), NULL, 10) : -1;
}

static int is_type(const unsigned char *p, size_t n, const char *type) {
    size_t k = strlen(type);
    return n > 9 + k && memcmp(p, "{\"type\":\"", 9) == 0 && memcmp(p + 9, type, k) == 0 &&
           p[9 + k] == '"';
}

/* A message's text starts with "P<publisher>." so its sender can spot it. */
static int sender_of(const unsigned char *text, size_t n) {
    if (n < 3 || text[0] != 'P') return -1;
    return atoi((const char *)text + 1);
}

/* Paced texts are "P<publisher>.T<send time, microseconds>.xxx". */
static void record_latency(const unsigned char *text, size_t n) {
    const unsigned char *t = memmem(text, n < 32 ? n : 32, ".T", 2);
    if (!t) return;
    double sent = strtoll((const char *)t + 2, NULL, 10) / 1e6;
    if (lat_n == lat_cap) {
        lat_cap = lat_cap ? lat_cap * 2 : 65536;
        lat = realloc(lat, lat_cap * sizeof *lat);
        if (!lat) die("realloc");
    }
    lat[lat_n++] = now() - sent;
}

static void got_message(int idx, const unsigned char *text, size_t n) {
    conn_t *c = &m[idx];
    if (publishing && rate > 0) record_latency(text, n);
    if (publishing) delivered++;
    if (publishing == 1) counted++;
    if (n >= 5 && memcmp(text, "probe", 5) == 0) c->probe = 1;
    else if (idx < P && c->inflight && sender_of(text, n) == idx) c->inflight--;
}

/* The history frames are in: page in what history-after skipped (oldest
 * first is what a reply drops), or the member is back. */
static void history_done(conn_t *c) {
    if (c->page_left > 0) {
        char req[128];
        snprintf(req, sizeof req, "{\"type\":\"history\",\"before\":%lld,\"limit\":%lld}",
                 c->page_before, c->page_left < 200 ? c->page_left : 200);
        if (send_json(c->fd, req) == 0) {
            c->paging = 1;
            c->phase = R_HISTORY;
            return;
        }
    }
    c->phase = R_BACK;
    c->last_seq = c->top > c->live_max ? c->top : c->live_max;
    c->back_at = now();
    back++;
}

static void room_seq(conn_t *c, long long seq) {
    if (c->phase == R_FRAMES) {
        if (c->hist_next < 0) c->hist_next = seq;
        if (seq != c->hist_next) gaps += seq > c->hist_next ? seq - c->hist_next : 0;
        c->hist_next = seq + 1;
        if (!c->paging && seq > c->top) c->top = seq;
        if (--c->hist_left == 0) history_done(c);
    } else if (c->phase == R_WELCOME || c->phase == R_HISTORY) {
        if (seq > c->live_max) c->live_max = seq;
    } else if (seq <= c->last_seq) {
        dups++; /* replayed with the welcome */
    } else {
        if (c->last_seq && seq > c->last_seq + 1) gaps += seq - c->last_seq - 1;
        c->last_seq = seq;
    }
}

static void chat_frame(int idx, const unsigned char *p, size_t n) {
    conn_t *c = &m[idx];
    if (is_type(p, n, "message") || is_type(p, n, "join") || is_type(p, n, "leave")) {
        if (p[9] == 'm') {
            const unsigned char *t = memmem(p, n, "\"text\":\"", 8);
            if (t) got_message(idx, t + 8, n - (size_t)(t + 8 - p));
        }
        long long seq = field_int(p, n, "\"seq\":");
        if (seq > 0) room_seq(c, seq);
    } else if (is_type(p, n, "welcome")) {
        if (c->state != S_JOINING) return;
        long long last = field_int(p, n, "\"last_seq\":");
        char epoch[40] = "";
        const unsigned char *e = memmem(p, n, "\"epoch\":\"", 9);
        if (e) sscanf((const char *)e + 9, "%39[^\"]", epoch);
        if (c->phase == R_WELCOME) {
            if (strcmp(epoch, c->epoch) || last < c->resume_from) { /* another epoch */
                epoch_changed++;
                c->new_epoch = 1; /* its old numbers mean nothing: no gap to count */
                c->resume_from = 0;
            }
            char req[128];
            snprintf(req, sizeof req, "{\"type\":\"history\",\"after\":%lld}", c->resume_from);
            if (send_json(c->fd, req) < 0) return lost_conn(idx);
            c->phase = R_HISTORY;
        } else if (c->last_seq < last) {
            c->last_seq = last; /* the replay that follows is older */
        }
        memcpy(c->epoch, epoch, sizeof epoch);
        joined_now(c);
    } else if (is_type(p, n, "history") && c->phase == R_HISTORY && c->paging) {
        c->hist_left = field_int(p, n, "\"count\":");
        if (c->hist_left <= 0) { /* pruned meanwhile: cannot be filled */
            unfilled += c->page_left;
            c->page_left = 0;
            return history_done(c);
        }
        c->hist_next = c->page_before - c->hist_left;
        c->page_before -= c->hist_left;
        c->page_left -= c->hist_left;
        paged += c->hist_left;
        c->phase = R_FRAMES;
    } else if (is_type(p, n, "history") && c->phase == R_HISTORY) {
        long long miss = field_int(p, n, "\"missed\":");
        if (miss < 0 || c->new_epoch) miss = 0;
        missed += miss;
        c->page_left = miss;
        c->page_before = c->resume_from + 1 + miss;
        c->top = c->resume_from;
        c->hist_left = field_int(p, n, "\"count\":");
        c->hist_next = c->new_epoch ? -1 : c->resume_from + 1 + miss;
        if (c->hist_left > 0) c->phase = R_FRAMES;
        else history_done(c);
    } else if (is_type(p, n, "ping")) {
        send_json(c->fd, "{\"type\":\"pong\"}");
    } else if (is_type(p, n, "shutdown") && !dropped && strcmp(mode, "restart") == 0) {
        dropped = 1;
        t_dropped = now();
    } else if (is_type(p, n, "error")) {
        fprintf(stderr, "member %d: %.*s\n", idx, (int)(n > 200 ? 200 : n), p);
    }
}

/* One complete RESP reply at p, or 0 if incomplete.  For an array of bulk
 * strings, *third points at the third element (a pub/sub payload). */
static size_t resp_reply(const unsigned char *p, size_t n, const unsigned char **third,
                         size_t *third_len, int *is_subscribe) {
    const unsigned char *end = p + n, *q = p;
    long items = 1;
    *third = NULL;
    *is_subscribe = 0;
    if (n && *q == '*') {
        const unsigned char *nl = memchr(q, '\n', (size_t)(end - q));
        if (!nl) return 0;
        items = strtol((const char *)q + 1, NULL, 10);
        q = nl + 1;
    }
    for (long i = 0; i < items; i++) {
        if (q >= end) return 0;
        const unsigned char *nl = memchr(q, '\n', (size_t)(end - q));
        if (!nl) return 0;
        if (*q == '$') {
            long len = strtol((const char *)q + 1, NULL, 10);
            const unsigned char *data = nl + 1;
            if (len < 0) { q = data; continue; }
            if (data + len + 2 > end) return 0;
            if (i == 0 && len == 9 && memcmp(data, "subscribe", 9) == 0) *is_subscribe = 1;
            if (i == 2) { *third = data; *third_len = (size_t)len; }
            q = data + len + 2;
        } else {
            q = nl + 1; /* :int, +simple, -error */
        }
    }
    return (size_t)(q - p);
}

static void on_readable(int idx) {
    conn_t *c = idx < N ? &m[idx] : &pub[idx - N];
    if (c->len == c->cap) {
        c->cap = c->cap ? c->cap * 2 : 16384;
        c->buf = realloc(c->buf, c->cap);
        if (!c->buf) die("realloc");
    }
    ssize_t r = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        lost_conn(idx);
        return;
    }
    if (publishing == 1) bytes_in += r;
    c->len += (size_t)r;
    size_t off = 0;
    while (c->fd >= 0 && off < c->len) {
        unsigned char *p = c->buf + off;
        size_t avail = c->len - off;
        if (chat) {
            if (avail < 4) break;
            uint32_t flen;
            memcpy(&flen, p, 4);
            flen = ntohl(flen);
            if (avail - 4 < flen) break;
            chat_frame(idx, p + 4, flen);
            off += 4 + flen;
        } else {
            const unsigned char *third;
            size_t third_len = 0;
            int sub;
            size_t used = resp_reply(p, avail, &third, &third_len, &sub);
            if (!used) break;
            if (idx < N && sub && c->state == S_JOINING) joined_now(c);
            else if (idx < N && third) got_message(idx, third, third_len);
            off += used;
        }
    }
    if (c->fd < 0) return;
    memmove(c->buf, c->buf + off, c->len - off);
    c->len -= off;
}

static void publish(int i, const char *text) {
    int rc;
    if (chat) {
        char say[8192 + 64];
        snprintf(say, sizeof say, "{\"type\":\"say\",\"text\":\"%s\"}", text);
        rc = send_json(m[i].fd, say);
    } else {
        const char *argv[] = {"PUBLISH", "room", text};
        rc = send_resp(pub[i].fd, 3, argv);
    }
    if (rc < 0) lost_conn(chat ? i : N + i);
    else published++;
}

static void pump(double wait_s) {
    struct epoll_event evs[512];
    int n = epoll_wait(ep, evs, 512, (int)(wait_s * 1000));
    for (int k = 0; k < n; k++) {
        int idx = (int)evs[k].data.u32;
        conn_t *c = idx < N ? &m[idx] : &pub[idx - N];
        if (c->fd < 0) continue;
        if (c->state == S_CONNECTING) on_connected(idx);
        else on_readable(idx);
    }
    if (strcmp(mode, "restart") == 0 && dropped) {
        double t = now();
        for (int i = 0; i < N + (chat ? 0 : P); i++) {
            conn_t *c = i < N ? &m[i] : &pub[i - N];
            if (c->state == S_WAIT && c->retry_at <= t) open_conn(i);
        }
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Seconds from the drop until the q-th fraction of members were back. */
static double back_quantile(double q) {
    double *t = malloc(sizeof *t * (size_t)N);
    int k = 0;
    for (int i = 0; i < N; i++)
        if (m[i].phase == R_BACK) t[k++] = m[i].back_at - t_dropped;
    double v = 0;
    if (k) {
        qsort(t, (size_t)k, sizeof *t, cmp_double);
        v = t[(int)(q * (k - 1))];
    }
    free(t);
    return v;
}

static long long all_joined(void) { return joined >= N + (chat ? 0 : P); }

static int stdin_line(double wait_s) {
    struct pollfd pfd = {.fd = 0, .events = POLLIN};
    char line[64];
    return poll(&pfd, 1, (int)(wait_s * 1000)) > 0 && read(0, line, sizeof line) > 0;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODE chat|redis PORT MEMBERS [key=value ...]\n", argv[0]);
        return 2;
    }
    mode = argv[1];
    chat = strcmp(argv[2], "chat") == 0;
    port = atoi(argv[3]);
    N = atoi(argv[4]);
    P = 100;
    for (int i = 5; i < argc; i++) {
        char *v = strchr(argv[i], '=');
        if (!v) continue;
        v++;
        if (!strncmp(argv[i], "publishers=", 11)) P = atoi(v);
        else if (!strncmp(argv[i], "bytes=", 6)) text_bytes = atoi(v);
        else if (!strncmp(argv[i], "seconds=", 8)) seconds = atof(v);
        else if (!strncmp(argv[i], "window=", 7)) window = atoi(v);
        else if (!strncmp(argv[i], "timeout=", 8)) timeout_s = atof(v);
        else if (!strncmp(argv[i], "sync=", 5)) sync_start = atoi(v);
        else if (!strncmp(argv[i], "drain=", 6)) drain_s = atof(v);
        else if (!strncmp(argv[i], "count=", 6)) max_published = atoll(v);
        else if (!strncmp(argv[i], "backoff=", 8)) backoff_first = atof(v);
        else if (!strncmp(argv[i], "port2=", 6)) port2 = atoi(v);
        else if (!strncmp(argv[i], "rate=", 5)) rate = atof(v);
    }
    if (P > N) P = N;
    if (strcmp(mode, "throughput") && strcmp(mode, "restart")) P = chat ? 0 : (P ? 1 : 0);
    if (!strcmp(mode, "hold")) P = 0;
    if (text_bytes < 8 || text_bytes > 8000) text_bytes = 100;
    srand((unsigned)getpid());
    ep = epoll_create1(0);
    m = calloc((size_t)N, sizeof *m);
    pub = calloc((size_t)(P ? P : 1), sizeof *pub);
    double t0 = now(), deadline = t0 + timeout_s;
    for (int i = 0; i < N; i++) open_conn(i);
    if (!chat)
        for (int i = 0; i < P; i++) open_conn(N + i);
    while (!all_joined() && now() < deadline) pump(0.05);
    double join_s = now() - t0;
    printf("seated members=%d joined=%lld join_s=%.3f\n", N, joined > N ? N : joined, join_s);
    fflush(stdout);
    if (!all_joined()) {
        printf("result mode=%s proto=%s members=%d timed_out=1 joined=%lld disconnects=%lld\n",
               mode, argv[2], N, joined, disconnects);
        return 1;
    }
    if (sync_start) stdin_line(30);

    char **texts = calloc((size_t)(P ? P : 1), sizeof *texts);
    for (int i = 0; i < P; i++) {
        texts[i] = malloc((size_t)text_bytes + 1);
        memset(texts[i], 'x', (size_t)text_bytes);
        int k = snprintf(texts[i], (size_t)text_bytes, "P%d.", i);
        texts[i][k] = 'x';
        texts[i][text_bytes] = 0;
    }
    if (!strcmp(mode, "storm")) {
        double t1 = now();
        if (chat) publish(0, "probe");
        else {
            const char *a[] = {"PUBLISH", "room", "probe"};
            send_resp(pub[0].fd, 3, a);
        }
        int heard = 0;
        while (heard < N && now() < deadline) {
            pump(0.05);
            heard = 0;
            for (int i = 0; i < N; i++) heard += m[i].probe;
        }
        printf("result mode=storm proto=%s members=%d join_s=%.3f settled_s=%.3f heard=%d "
               "disconnects=%lld\n", argv[2], N, join_s, join_s + now() - t1, heard, disconnects);
        return heard == N ? 0 : 1;
    }
    if (!strcmp(mode, "hold")) {
        struct pollfd pfd = {.fd = 0, .events = POLLIN};
        char line[64];
        while (now() < deadline) {
            pump(0.2);
            if (poll(&pfd, 1, 0) > 0 && read(0, line, sizeof line) <= 0) break;
        }
        printf("result mode=hold proto=%s members=%d disconnects=%lld\n", argv[2], N, disconnects);
        return 0;
    }
    if (!strcmp(mode, "restart")) {
        /* publish one message at a time per publisher until the server goes */
        while (!dropped && now() < deadline) {
            for (int i = 0; i < P; i++)
                if (m[i].state == S_JOINED && !m[i].inflight) {
                    publish(i, texts[i]);
                    m[i].inflight = 1;
                }
            pump(0.01);
        }
        joined = 0;
        while (back < N && now() < deadline) pump(0.05);
        printf("result mode=restart proto=%s members=%d back=%lld back_s=%.3f back_p50_s=%.3f "
               "lost=%lld missed=%lld paged=%lld epoch_changed=%lld connects=%lld "
               "refused=%lld\n", argv[2], N, back, back_quantile(1.0), back_quantile(0.5),
               gaps + unfilled, missed, paged, epoch_changed, attempts - N, refused);
        return back == N ? 0 : 1;
    }

    /* throughput */
    double start = now(), end_at = start + seconds;
    publishing = 1;
    long long next = 0; /* paced: the next message's number on the schedule */
    while (rate > 0 && now() < end_at && (!max_published || published < max_published)) {
        double t = now();
        while (start + next / rate <= t) {
            int i = (int)(next++ % P);
            int fd = chat ? m[i].fd : pub[i].fd;
            if (fd < 0) continue;
            char text[8192];
            int k = snprintf(text, sizeof text, "P%d.T%lld.", i, (long long)(now() * 1e6));
            while (k < text_bytes) text[k++] = 'x';
            text[k] = 0;
            publish(i, text);
        }
        double wait = start + next / rate - now();
        pump(wait > 0.05 ? 0.05 : wait > 0.001 ? wait : 0);
    }
    while (rate <= 0 && now() < end_at && (!max_published || published < max_published)) {
        for (int i = 0; i < P; i++)
            while (m[i].inflight < window && (chat ? m[i].fd : pub[i].fd) >= 0 &&
                   (!max_published || published < max_published)) {
                publish(i, texts[i]);
                m[i].inflight++;
            }
        pump(0.05);
    }
    double elapsed = now() - start;
    publishing = 2;
    double drain_until = now() + drain_s;
    while (delivered < published * (N - disconnects) && now() < drain_until) pump(0.05);
    long long lost = published * N - delivered;
    if (rate > 0) { /* before the result line, so a reader of it has both */
        if (lat_n) qsort(lat, lat_n, sizeof *lat, cmp_double);
        double p50 = lat_n ? lat[lat_n / 2] : 0, p99 = lat_n ? lat[(size_t)(lat_n * 0.99)] : 0;
        printf("latency samples=%zu p50_ms=%.3f p99_ms=%.3f max_ms=%.3f\n", lat_n, p50 * 1e3,
               p99 * 1e3, lat_n ? lat[lat_n - 1] * 1e3 : 0);
    }
    printf("result mode=throughput proto=%s members=%d publishers=%d bytes=%d window=%d "
           "join_s=%.3f seconds=%.2f deliveries=%lld deliveries_per_s=%.0f MB_per_s=%.1f "
           "published=%lld lost=%lld seq_gaps=%lld disconnects=%lld\n",
           argv[2], N, P, text_bytes, window, join_s, elapsed, counted, counted / elapsed,
           bytes_in / elapsed / 1e6, published, lost < 0 ? 0 : lost, gaps, disconnects);
    return 0;
}
