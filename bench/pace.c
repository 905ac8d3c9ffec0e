/* pace: an open-loop HTTP/1.1 load at a fixed rate, for checking the paced scenario.
 *
 *   pace PORT PATH RATE CONNECTIONS SECONDS [poisson]
 *
 * Request k is due at start + k/RATE (evenly spaced; with "poisson", the
 * gaps are exponential with the same mean). At its due time it goes out on
 * the idle keep-alive connection to 127.0.0.1:PORT that has been idle the
 * longest (first in, first out, so the load is spread over every
 * connection, as wrk spreads it); when none is idle it waits in a queue.
 * Its latency counts from its due time to its answer's last byte, so a
 * request that waited, or that the pacer itself sent late, is not hidden
 * (no coordinated omission); how late each request left is reported apart.
 * The first second is a warm-up and is not counted.
 *
 * Prints one JSON line, always:
 *   requests  every answer, the warm-up's too (what a server's CPU time is divided by)
 *   counted   requests due after the warm-up; the percentiles are of those answered
 *   errors    counted requests that got no 2xx answer this tool reads (a non-2xx
 *             status, no Content-Length, a closed connection) or none at all:
 *             still unsent or unanswered 5 s after the end
 *   rps       counted answers that completed within the measured window, a second
 *   waited    counted requests that found no idle connection at their due time
 *   late_p50_ms, late_p99_ms   how long after its due time a request was written
 *   p50_ms ... max_ms          latency from the due time
 *
 * Why this exists (docs/performance.md, "does the paced load's shape make the
 * tail?"): wrk's Lua delay() is truncated to whole milliseconds, so wrk's paced
 * requests leave in bursts; this sends them spread out. The schedule's timer is
 * a timerfd armed at each request's due time. Linux only; libc and libm.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536
#define GRACE 5000000000u /* ns after the end that answers are still awaited */

typedef struct {
    int fd;
    int busy;
    uint64_t due;  /* when the request in flight was due, ns */
    size_t have;   /* bytes of the answer so far */
    long need;     /* the answer's whole length once its head is in; -1 not yet */
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

/* A connection, connected (loopback: a blocking connect is immediate), then non-blocking. */
static int dial(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        perror("pace: connect");
        exit(1);
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

/* A fresh connection in the place of c's (closed by the server, or left unusable). */
static void redial(int ep, conn_t *c, uint32_t id, int port) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = dial(port);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = id};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

/* The answer's whole length once its head is complete: -1 not yet, -2 not
 * one this tool reads (no Content-Length, chunked, not 2xx). */
static long answer_length(const char *buf, size_t have) {
    const char *end = memmem(buf, have, "\r\n\r\n", 4);
    if (end == NULL) return -1;
    size_t head = (size_t)(end - buf) + 4;
    if (head < 16 || memcmp(buf, "HTTP/1.", 7) != 0 || buf[9] != '2') return -2;
    long length = -2;
    for (const char *line = (const char *)memchr(buf, '\n', head) + 1; line < end;) {
        const char *next = memchr(line, '\n', (size_t)(end + 2 - line));
        if (strncasecmp(line, "content-length:", 15) == 0) length = strtol(line + 15, NULL, 10);
        if (strncasecmp(line, "transfer-encoding:", 18) == 0) return -2;
        line = next + 1;
    }
    return length < 0 ? -2 : (long)head + length;
}

static double pct(const uint64_t *xs, size_t n, double p) {
    return n ? (double)xs[(size_t)((double)(n - 1) * p)] / 1e6 : 0.0;
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
    srand48((long)now_ns());

    char request[512];
    int reqlen = snprintf(request, sizeof request,
                          "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: pace\r\n\r\n", path, port);
    conn_t *conns = calloc((size_t)nconn, sizeof *conns);
    int *idle = malloc(sizeof(int) * (size_t)nconn); /* a ring: idle[ihead..ihead+nidle) */
    int ihead = 0, nidle = 0;
    int ep = epoll_create1(0);
    for (int i = 0; i < nconn; i++) {
        conns[i].fd = dial(port);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
        idle[(ihead + nidle++) % nconn] = i;
    }
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);

    size_t cap = (size_t)(rate * (seconds + 2) * 1.5) + 64;
    uint64_t *lat = malloc(sizeof(uint64_t) * cap);
    uint64_t *late = malloc(sizeof(uint64_t) * cap);
    uint64_t *backlog = malloc(sizeof(uint64_t) * cap); /* due times waiting for a connection */
    size_t nlat = 0, nlate = 0, bhead = 0, btail = 0;
    long errors = 0, waited = 0, answered = 0, counted = 0, in_window = 0, told = 0;
    uint64_t start = now_ns() + 100000000u, warm = start + 1000000000u;
    uint64_t stop = warm + (uint64_t)(seconds * 1e9);
    double next = (double)start;
    int armed = 0;

    for (;;) {
        uint64_t t = now_ns();
        while ((uint64_t)next <= t && (uint64_t)next < stop && btail - bhead < cap) {
            uint64_t due = (uint64_t)next; /* every request now due */
            if (due >= warm) {
                counted++;
                if (btail - bhead >= (size_t)nidle) waited++; /* as many ahead as idle connections */
            }
            backlog[btail++ % cap] = due;
            double gap = 1e9 / rate;
            next += poisson ? -log(1.0 - drand48()) * gap : gap;
            armed = 0;
        }
        while (bhead != btail && nidle > 0) { /* what is due, on the longest-idle connections */
            int id = idle[ihead];
            ihead = (ihead + 1) % nconn;
            nidle--;
            conn_t *c = &conns[id];
            c->due = backlog[bhead++ % cap];
            c->busy = 1;
            c->have = 0;
            c->need = -1;
            if (c->due >= warm && nlate < cap) late[nlate++] = t - c->due;
            if (send(c->fd, request, (size_t)reqlen, MSG_NOSIGNAL) != reqlen) {
                fprintf(stderr, "pace: a write failed (%s); reconnecting\n", strerror(errno));
                if (c->due >= warm) errors++;
                redial(ep, c, (uint32_t)id, port);
                c->busy = 0;
                idle[(ihead + nidle++) % nconn] = id;
            }
        }
        if (t >= stop && nidle == nconn && bhead == btail) break;
        if (t >= stop + GRACE) break; /* what is still missing is counted below */
        if (!armed && (uint64_t)next < stop) {
            struct itimerspec its = {0};
            its.it_value.tv_sec = (time_t)((uint64_t)next / 1000000000u);
            its.it_value.tv_nsec = (long)((uint64_t)next % 1000000000u);
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
            armed = 1;
        }
        struct epoll_event evs[256];
        int n = epoll_wait(ep, evs, 256, t >= stop ? 100 : 1000);
        uint64_t got = now_ns();
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            if (id == UINT32_MAX) {
                uint64_t ticks;
                if (read(tfd, &ticks, sizeof ticks) < 0) { /* a spurious wake-up */ }
                armed = 0;
                continue;
            }
            conn_t *c = &conns[id];
            ssize_t r = read(c->fd, c->buf + c->have, BUF - c->have);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            long bad = 0;
            if (r <= 0) {
                bad = c->busy; /* closed: an error only with a request in flight */
                if (c->busy && told++ < 5) fprintf(stderr, "pace: connection %u closed with a request in flight\n", id);
            } else {
                c->have += (size_t)r;
                if (!c->busy) {
                    bad = 0; /* bytes nobody asked for: drop the connection */
                    fprintf(stderr, "pace: connection %u sent bytes with no request in flight\n", id);
                    r = 0;
                } else {
                    if (c->need == -1) c->need = answer_length(c->buf, c->have);
                    if (c->need == -2 || (c->need > 0 && c->have > (size_t)c->need) || c->have == BUF) {
                        if (told++ < 5) { /* the first few, their status line only */
                            size_t shown = strcspn(c->buf, "\r\n");
                            fprintf(stderr, "pace: an answer this tool does not read: %.*s\n",
                                    (int)(shown < 60 && shown < c->have ? shown : 0), c->buf);
                        }
                        bad = 1;
                        r = 0;
                    } else if (c->need > 0 && c->have == (size_t)c->need) {
                        if (c->due >= warm && c->due < stop && nlat < cap) lat[nlat++] = got - c->due;
                        if (c->due >= warm && got < stop) in_window++;
                        answered++;
                        c->busy = 0;
                        idle[(ihead + nidle++) % nconn] = (int)id;
                        continue;
                    } else {
                        continue; /* more of the answer to come */
                    }
                }
            }
            if (r <= 0) { /* closed, or unusable: a fresh connection takes its place */
                if (bad && c->due >= warm) errors++;
                redial(ep, c, id, port);
                if (c->busy) {
                    c->busy = 0;
                    idle[(ihead + nidle++) % nconn] = (int)id;
                }
            }
        }
    }
    /* Counted requests with neither an answer nor an error: never sent, or never answered. */
    long missing = counted - (long)nlat - errors;
    if (missing > 0) errors += missing;
    qsort(lat, nlat, sizeof *lat, cmp_u64);
    qsort(late, nlate, sizeof *late, cmp_u64);
    printf("{\"requests\": %ld, \"counted\": %ld, \"errors\": %ld, \"rps\": %.1f, \"waited\": %ld, "
           "\"late_p50_ms\": %.3f, \"late_p99_ms\": %.3f, \"p50_ms\": %.3f, \"p90_ms\": %.3f, "
           "\"p99_ms\": %.3f, \"p999_ms\": %.3f, \"max_ms\": %.3f}\n",
           answered, counted, errors, (double)in_window / seconds, waited, pct(late, nlate, 0.5),
           pct(late, nlate, 0.99), pct(lat, nlat, 0.5), pct(lat, nlat, 0.9), pct(lat, nlat, 0.99),
           pct(lat, nlat, 0.999), pct(lat, nlat, 1.0));
    return 0;
}
