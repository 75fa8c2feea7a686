/*
 * UDP load generator for the shardudp benchmark.
 *
 * One thread, N connected source sockets ("flows"), sendmmsg/recvmmsg in
 * batches so that the generator spends as little CPU per datagram as the
 * kernel allows and the server under test is what saturates.
 *
 * Loopback only: the target must be in 127.0.0.0/8 or be ::1. Anything else
 * is refused before a socket is opened.
 *
 * Prints one JSON object on stdout; errors go to stderr with exit code 2.
 * Built by bench/build.py with the system cc; bench/loadgen.py is the
 * pure-Python fallback with the same options and report.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FLOWS 4096
#define MAX_BATCH 256
#define MAX_SIZE 65507

static volatile sig_atomic_t stop_requested = 0;

static void on_signal(int sig) {
    (void)sig;
    stop_requested = 1;
}

static void die(const char *msg) {
    fprintf(stderr, "loadgen: %s\n", msg);
    exit(2);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

struct options {
    char host[64];
    int port;
    int flows;
    double rate; /* datagrams per second over all flows; 0 = flat out */
    int echo;
    int size;
    double duration;
    int batch;
    double drain;
    double drain_idle;
    int rcvbuf;
};

static long parse_long(const char *name, const char *v, long lo, long hi) {
    char *end = NULL;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end != '\0' || x < lo || x > hi) {
        fprintf(stderr, "loadgen: %s must be an integer in [%ld, %ld], got '%s'\n", name, lo,
                hi, v);
        exit(2);
    }
    return x;
}

static double parse_double(const char *name, const char *v, double lo, double hi) {
    char *end = NULL;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end != '\0' || !(x >= lo && x <= hi)) {
        fprintf(stderr, "loadgen: %s must be a number in [%g, %g], got '%s'\n", name, lo, hi, v);
        exit(2);
    }
    return x;
}

/* "127.0.0.1:9999", "[::1]:9999" or "localhost:9999". */
static void parse_target(struct options *o, const char *v) {
    const char *colon;
    size_t hlen;
    if (v[0] == '[') {
        const char *close = strchr(v, ']');
        if (!close || close[1] != ':') die("target must look like [::1]:PORT");
        hlen = (size_t)(close - v - 1);
        if (hlen >= sizeof o->host) die("target host too long");
        memcpy(o->host, v + 1, hlen);
        colon = close + 1;
    } else {
        colon = strrchr(v, ':');
        if (!colon) die("target must be HOST:PORT, e.g. 127.0.0.1:9999");
        hlen = (size_t)(colon - v);
        if (hlen >= sizeof o->host) die("target host too long");
        memcpy(o->host, v, hlen);
    }
    o->host[hlen] = '\0';
    if (strcmp(o->host, "localhost") == 0) strcpy(o->host, "127.0.0.1");
    o->port = (int)parse_long("target port", colon + 1, 1, 65535);
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --target HOST:PORT [--flows N] [--rate PPS|0] [--mode echo|sink]\n"
            "               [--size BYTES] [--duration S] [--batch N] [--drain S]\n"
            "               [--drain-idle S] [--rcvbuf BYTES]\n"
            "  target must be loopback (127.0.0.0/8 or [::1]); rate 0 means flat out\n");
}

static void parse_args(struct options *o, int argc, char **argv) {
    memset(o, 0, sizeof *o);
    o->flows = 64;
    o->rate = 0;
    o->echo = 1;
    o->size = 64;
    o->duration = 5;
    o->batch = 32;
    o->drain = 1.0;
    o->drain_idle = 0.1;
    o->rcvbuf = 4 << 20;
    int have_target = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage();
            exit(0);
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "loadgen: option %s needs a value\n", a);
            exit(2);
        }
        const char *v = argv[++i];
        if (strcmp(a, "--target") == 0) {
            parse_target(o, v);
            have_target = 1;
        } else if (strcmp(a, "--flows") == 0) {
            o->flows = (int)parse_long(a, v, 1, MAX_FLOWS);
        } else if (strcmp(a, "--rate") == 0) {
            o->rate = parse_double(a, v, 0, 1e9);
        } else if (strcmp(a, "--mode") == 0) {
            if (strcmp(v, "echo") == 0) o->echo = 1;
            else if (strcmp(v, "sink") == 0) o->echo = 0;
            else die("--mode must be echo or sink");
        } else if (strcmp(a, "--size") == 0) {
            o->size = (int)parse_long(a, v, 1, MAX_SIZE);
        } else if (strcmp(a, "--duration") == 0) {
            o->duration = parse_double(a, v, 0.01, 3600);
        } else if (strcmp(a, "--batch") == 0) {
            o->batch = (int)parse_long(a, v, 1, MAX_BATCH);
        } else if (strcmp(a, "--drain") == 0) {
            o->drain = parse_double(a, v, 0, 60);
        } else if (strcmp(a, "--drain-idle") == 0) {
            o->drain_idle = parse_double(a, v, 0, 60);
        } else if (strcmp(a, "--rcvbuf") == 0) {
            o->rcvbuf = (int)parse_long(a, v, 0, 1 << 30);
        } else {
            usage();
            fprintf(stderr, "loadgen: unknown option %s\n", a);
            exit(2);
        }
    }
    if (!have_target) {
        usage();
        die("--target is required");
    }
}

__attribute__((noreturn)) static void refuse_non_loopback(const char *host) {
    fprintf(stderr, "loadgen: refusing non-loopback target %s (only 127.0.0.0/8 or ::1)\n", host);
    exit(2);
}

/* Resolve the target and refuse anything that is not loopback. */
static socklen_t loopback_addr(const struct options *o, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, o->host, &s4->sin_addr) == 1) {
        if ((ntohl(s4->sin_addr.s_addr) >> 24) != 127)
            refuse_non_loopback(o->host);
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)o->port);
        return sizeof *s4;
    }
    if (inet_pton(AF_INET6, o->host, &s6->sin6_addr) == 1) {
        if (!IN6_IS_ADDR_LOOPBACK(&s6->sin6_addr))
            refuse_non_loopback(o->host);
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)o->port);
        return sizeof *s6;
    }
    fprintf(stderr, "loadgen: target host '%s' is not an IP literal (use 127.0.0.1 or [::1])\n",
            o->host);
    exit(2);
}

static int open_flow(const struct options *o, const struct sockaddr_storage *dst, socklen_t len) {
    int fd = socket(dst->ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("loadgen: socket");
        exit(2);
    }
    if (o->rcvbuf > 0) {
        /* Replies arrive in bursts while we are busy sending; a small buffer
         * would show the generator's own drops as server loss. */
        (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &o->rcvbuf, sizeof o->rcvbuf);
    }
    /* Connected: the route is looked up once and replies from anyone else are
     * filtered out by the kernel. */
    if (connect(fd, (const struct sockaddr *)dst, len) < 0) {
        perror("loadgen: connect");
        exit(2);
    }
    return fd;
}

struct counters {
    uint64_t sent;
    uint64_t received;
    uint64_t received_in_window;
    uint64_t send_errors;
    uint64_t recv_errors;
};

static struct mmsghdr rmsgs[MAX_BATCH];
static struct iovec riov[MAX_BATCH];
static char rbuf[MAX_BATCH][2048];

/* Read everything queued on one flow; returns datagrams read. */
static uint64_t drain_flow(int fd, struct counters *c) {
    uint64_t total = 0;
    for (int guard = 0; guard < 1024; guard++) {
        int n = recvmmsg(fd, rmsgs, MAX_BATCH, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
            c->recv_errors++; /* e.g. ECONNREFUSED while the server is gone */
            break;
        }
        if (n == 0) break;
        total += (uint64_t)n;
        if (n < MAX_BATCH) break;
    }
    c->received += total;
    return total;
}

static uint64_t drain_all(const int *fds, int nfds, struct counters *c) {
    uint64_t total = 0;
    for (int i = 0; i < nfds; i++) total += drain_flow(fds[i], c);
    return total;
}

/* Wait up to `timeout` seconds for any flow to become readable. */
static void wait_readable(struct pollfd *pfds, int nfds, double timeout) {
    if (timeout <= 0) return;
    struct timespec ts;
    ts.tv_sec = (time_t)timeout;
    ts.tv_nsec = (long)((timeout - (double)ts.tv_sec) * 1e9);
    (void)ppoll(pfds, (nfds_t)nfds, &ts, NULL);
}

int main(int argc, char **argv) {
    struct options o;
    parse_args(&o, argc, argv);
    struct sockaddr_storage dst;
    socklen_t dlen = loopback_addr(&o, &dst);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    int *fds = calloc((size_t)o.flows, sizeof *fds);
    struct pollfd *pfds = calloc((size_t)o.flows, sizeof *pfds);
    if (!fds || !pfds) die("out of memory");
    for (int i = 0; i < o.flows; i++) {
        fds[i] = open_flow(&o, &dst, dlen);
        pfds[i].fd = fds[i];
        pfds[i].events = POLLIN;
    }

    char *payload = malloc((size_t)o.size);
    if (!payload) die("out of memory");
    memset(payload, 'x', (size_t)o.size);
    static struct mmsghdr smsgs[MAX_BATCH];
    static struct iovec siov[MAX_BATCH];
    for (int i = 0; i < MAX_BATCH; i++) {
        siov[i].iov_base = payload;
        siov[i].iov_len = (size_t)o.size;
        smsgs[i].msg_hdr.msg_iov = &siov[i];
        smsgs[i].msg_hdr.msg_iovlen = 1;
        riov[i].iov_base = rbuf[i];
        riov[i].iov_len = sizeof rbuf[i];
        rmsgs[i].msg_hdr.msg_iov = &riov[i];
        rmsgs[i].msg_hdr.msg_iovlen = 1;
    }

    struct counters c;
    memset(&c, 0, sizeof c);
    int flow = 0;
    /* At most 1 ms of traffic (and at least one batch) sent back to back. */
    double max_burst = o.rate * 0.001 > o.batch ? o.rate * 0.001 : o.batch;
    double start = now_s();
    const double t0 = start;
    double end = start + o.duration;
    double t = start;
    while (!stop_requested && t < end) {
        int want;
        if (o.rate > 0) {
            double due = (t - start) * o.rate - (double)c.sent;
            if (due > max_burst) {
                /* We were descheduled: forget the backlog rather than fire it
                 * in one burst that would overflow the server's queue and
                 * show up as loss the server did not cause. The report's
                 * sent_pps shows the rate actually achieved. */
                start += (due - max_burst) / o.rate;
                due = max_burst;
            }
            if (due < 1) {
                /* Ahead of schedule: wait for the next slot, collecting
                 * replies meanwhile instead of spinning. */
                double wait = (1 - due) / o.rate;
                if (o.echo) {
                    wait_readable(pfds, o.flows, wait);
                    drain_all(fds, o.flows, &c);
                } else {
                    struct timespec ts = {(time_t)wait, (long)((wait - (long)wait) * 1e9)};
                    nanosleep(&ts, NULL);
                }
                t = now_s();
                continue;
            }
            want = due > o.batch ? o.batch : (int)due;
        } else {
            want = o.batch;
        }
        int n = sendmmsg(fds[flow], smsgs, (unsigned)want, MSG_DONTWAIT);
        if (n < 0) {
            /* ENOBUFS/EAGAIN under overload, ECONNREFUSED when nobody listens:
             * count and carry on so one bad moment does not end the run. */
            c.send_errors++;
        } else {
            c.sent += (uint64_t)n;
        }
        flow = (flow + 1) % o.flows;
        if (o.echo && (flow == 0 || o.rate > 0)) {
            /* In flat-out mode read once per round over all flows: often
             * enough to keep reply queues short, rare enough to stay cheap. */
            if (o.rate > 0) drain_flow(fds[flow], &c);
            else drain_all(fds, o.flows, &c);
        }
        t = now_s();
    }
    double send_end = now_s();
    if (o.echo) drain_all(fds, o.flows, &c);
    c.received_in_window = c.received;

    /* Collect late replies: stop once everything came back, after `drain`
     * seconds, or after `drain_idle` seconds with nothing arriving. */
    if (o.echo && o.drain > 0) {
        double deadline = send_end + o.drain;
        double last_rx = now_s();
        while (!stop_requested && c.received < c.sent) {
            double tnow = now_s();
            if (tnow >= deadline || tnow - last_rx > o.drain_idle) break;
            wait_readable(pfds, o.flows, 0.02);
            if (drain_all(fds, o.flows, &c) > 0) last_rx = now_s();
        }
    }

    double elapsed = send_end - t0;
    uint64_t lost = o.echo ? (c.sent > c.received ? c.sent - c.received : 0) : 0;
    printf("{\"impl\": \"c\", \"target\": \"%s%s%s:%d\", \"mode\": \"%s\", \"flows\": %d, "
           "\"size\": %d, \"rate\": %.1f, \"duration_s\": %.6f, \"sent\": %llu, "
           "\"received\": %llu, \"received_in_window\": %llu, \"lost\": %llu, "
           "\"loss\": %.6f, \"send_errors\": %llu, \"recv_errors\": %llu, "
           "\"sent_pps\": %.1f, \"recv_pps\": %.1f}\n",
           dst.ss_family == AF_INET6 ? "[" : "", o.host, dst.ss_family == AF_INET6 ? "]" : "",
           o.port, o.echo ? "echo" : "sink", o.flows, o.size, o.rate, elapsed,
           (unsigned long long)c.sent, (unsigned long long)c.received,
           (unsigned long long)c.received_in_window, (unsigned long long)lost,
           (o.echo && c.sent) ? (double)lost / (double)c.sent : 0.0,
           (unsigned long long)c.send_errors, (unsigned long long)c.recv_errors,
           elapsed > 0 ? (double)c.sent / elapsed : 0.0,
           (o.echo && elapsed > 0) ? (double)c.received_in_window / elapsed : 0.0);
    for (int i = 0; i < o.flows; i++) close(fds[i]);
    free(fds);
    free(pfds);
    free(payload);
    return 0;
}
