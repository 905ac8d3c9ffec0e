/* pace: an open-loop HTTP/1.1 load at a fixed rate, for the paced scenario.
 *
 *   pace PORT PATH RATE CONNECTIONS SECONDS [poisson]
 *
 * Request k is due at start + k/RATE (evenly spaced; with "poisson", the
 * gaps are exponential with the same mean). At its due time it goes out on
 * an idle keep-alive connection to 127.0.0.1:PORT; when none is idle it
 * waits, and its latency still counts from its due time (no coordinated
 * omission). Latency ends at the answer's last byte. The first second is a
 * warm-up and is not counted. Prints one JSON line: requests (all answers,
 * the warm-up's too: what the server's CPU time is divided by), counted (the
 * ones the percentiles are of), errors, the achieved rate, how many counted
 * requests waited 100 µs or more for an idle connection, and p50, p90, p99,
 * p99.9 and max in milliseconds.
 *
 * Why not wrk's Lua delay() or h2load --rps (docs/performance.md, "Paced
 * load"): wrk truncates the delay to whole milliseconds and h2load starts
 * every connection's ticker together, so both send bursts (at 10,000 req/s
 * the median wrk-paced request arrives in a burst of 7 within 20 µs of each
 * other, the p99 one in a burst of 24), and the tail they measure is the
 * burst's queue. Timers here are a timerfd with a 1 ns timer slack.
 *
 * Answers are read by Content-Length (the bench's upstream always sends
 * one); a status other than 2xx, a chunked answer or a closed connection is
 * an error. Linux only; no dependency beyond libc and libm.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536

typedef struct {
    int fd;
    int busy;
    uint64_t due;      /* when the request in flight was due, ns */
    size_t have;       /* bytes of the answer so far */
    long need;         /* the answer's whole length once its head is in, else -1 */
    char buf[BUF];
} conn_t;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int dial(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        perror("pace: connect");
        exit(1);
    }
    return fd;
}

/* The answer's whole length once its head is complete: -1 not yet, -2 not
 * one this tool reads (no Content-Length, chunked, not 2xx). */
static long answer_length(const char *buf, size_t have) {
    const char *end = memmem(buf, have, "\r\n\r\n", 4);
    if (end == NULL) return -1;
    size_t head = (size_t)(end - buf) + 4;
    if (have < 12 || memcmp(buf, "HTTP/1.", 7) != 0 || buf[9] != '2') return -2;
    long length = -2;
    for (const char *line = memchr(buf, '\n', head) + 1; line < end;) {
        const char *next = memchr(line, '\n', (size_t)(end + 2 - line));
        if (strncasecmp(line, "content-length:", 15) == 0) length = strtol(line + 15, NULL, 10);
        if (strncasecmp(line, "transfer-encoding:", 18) == 0) return -2;
        line = next + 1;
    }
    return length < 0 ? -2 : (long)head + length;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: pace PORT PATH RATE CONNECTIONS SECONDS [poisson]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    const char *path = argv[2];
    double rate = atof(argv[3]);
    int nconn = atoi(argv[4]);
    double seconds = atof(argv[5]);
    int poisson = argc > 6 && strcmp(argv[6], "poisson") == 0;
    if (rate <= 0 || nconn <= 0 || seconds <= 0) return 2;
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    srand48((long)now_ns());

    char request[512];
    int reqlen = snprintf(request, sizeof request,
                          "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: pace\r\n\r\n", path, port);
    conn_t *conns = calloc((size_t)nconn, sizeof *conns);
    int *idle = malloc(sizeof(int) * (size_t)nconn);
    int nidle = 0;
    int ep = epoll_create1(0);
    for (int i = 0; i < nconn; i++) {
        conns[i].fd = dial(port);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
        idle[nidle++] = i;
    }
    usleep(200000); /* every connection established */
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);

    size_t cap = (size_t)(rate * (seconds + 2)) + 16;
    uint64_t *lat = malloc(sizeof(uint64_t) * cap);
    uint64_t *backlog = malloc(sizeof(uint64_t) * cap); /* due times waiting for a connection */
    size_t nlat = 0, bhead = 0, btail = 0;
    long errors = 0, queued = 0, answered = 0;
    uint64_t start = now_ns() + 1000000, warm = start + 1000000000u;
    uint64_t stop = warm + (uint64_t)(seconds * 1e9);
    double next = (double)start;
    int armed_for_next = 0;

    for (;;) {
        uint64_t t = now_ns();
        while ((uint64_t)next <= t && (uint64_t)next < stop) { /* every request now due */
            backlog[btail++ % cap] = (uint64_t)next;
            double gap = 1e9 / rate;
            next += poisson ? -log(1.0 - drand48()) * gap : gap;
            armed_for_next = 0;
        }
        while (bhead != btail && nidle > 0) { /* send what is due on idle connections */
            conn_t *c = &conns[idle[--nidle]];
            c->due = backlog[bhead++ % cap];
            if (c->due >= warm && t - c->due > 100000u) queued++; /* waited 100 µs or more for a connection */
            c->busy = 1;
            c->have = 0;
            c->need = -1;
            if (write(c->fd, request, (size_t)reqlen) != reqlen) {
                perror("pace: write");
                return 1;
            }
        }
        if (t >= stop && nidle == nconn) break;
        if (t >= stop + 5000000000u) { /* answers still missing 5 s after the end */
            errors += nconn - nidle;
            break;
        }
        if (!armed_for_next && (uint64_t)next < stop) {
            struct itimerspec its = {0};
            its.it_value.tv_sec = (time_t)((uint64_t)next / 1000000000u);
            its.it_value.tv_nsec = (long)((uint64_t)next % 1000000000u);
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
            armed_for_next = 1;
        }
        struct epoll_event evs[256];
        int n = epoll_wait(ep, evs, 256, t >= stop ? 100 : 1000);
        uint64_t got = now_ns();
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            if (id == UINT32_MAX) {
                uint64_t ticks;
                if (read(tfd, &ticks, sizeof ticks) < 0) { /* nothing: a spurious wake */ }
                armed_for_next = 0;
                continue;
            }
            conn_t *c = &conns[id];
            ssize_t r = read(c->fd, c->buf + c->have, BUF - c->have);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN) continue;
                fprintf(stderr, "pace: connection %u closed\n", id);
                return 1;
            }
            c->have += (size_t)r;
            if (c->need == -1) c->need = answer_length(c->buf, c->have);
            if (c->need == -2 || c->have > (size_t)c->need || c->have == BUF) {
                fprintf(stderr, "pace: an answer this tool does not read (%.40s)\n", c->buf);
                errors++;
                return 1;
            }
            if (c->need > 0 && c->have == (size_t)c->need) {
                if (c->due >= warm && c->due < stop && nlat < cap) lat[nlat++] = got - c->due;
                answered++;
                c->busy = 0;
                idle[nidle++] = (int)id;
            }
        }
    }
    qsort(lat, nlat, sizeof *lat, cmp_u64);
#define PCT(p) (nlat ? (double)lat[(size_t)((double)(nlat - 1) * (p))] / 1e6 : 0.0)
    printf("{\"requests\": %ld, \"counted\": %zu, \"errors\": %ld, \"rps\": %.1f, \"waited\": %ld, "
           "\"p50_ms\": %.3f, \"p90_ms\": %.3f, \"p99_ms\": %.3f, \"p999_ms\": %.3f, \"max_ms\": %.3f}\n",
           answered, nlat, errors, (double)nlat / seconds, queued, PCT(0.5), PCT(0.9), PCT(0.99),
           PCT(0.999), PCT(1.0));
    return 0;
}
