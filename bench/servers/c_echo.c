/*
 * Baseline: a recvmmsg/sendmmsg UDP echo (or sink) on one socket.
 *
 * This is the one-core limit the Python servers are measured against: the
 * least user-space work per datagram the kernel interface allows.
 *
 * usage: c_echo HOST PORT echo|sink [--rcvbuf BYTES]
 * Prints "READY <port>" once bound (PORT 0 picks a free one) and
 * "COUNT <n>" on SIGTERM/SIGINT before exiting.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64

static volatile sig_atomic_t stop_requested = 0;

static void on_signal(int sig) {
    (void)sig;
    stop_requested = 1;
}

int main(int argc, char **argv) {
    int shape_ok = argc == 4 || (argc == 6 && strcmp(argv[4], "--rcvbuf") == 0);
    if (!shape_ok || (strcmp(argv[3], "echo") != 0 && strcmp(argv[3], "sink") != 0)) {
        fprintf(stderr, "usage: c_echo HOST PORT echo|sink [--rcvbuf BYTES]\n");
        return 2;
    }
    int rcvbuf = 0;
    if (argc == 6) {
        char *rend = NULL;
        long v = strtol(argv[5], &rend, 10);
        if (*rend != '\0' || v < 0 || v > (1L << 30)) {
            fprintf(stderr, "c_echo: bad --rcvbuf '%s'\n", argv[5]);
            return 2;
        }
        rcvbuf = (int)v;
    }
    int echo = strcmp(argv[3], "echo") == 0;
    char *end = NULL;
    long port = strtol(argv[2], &end, 10);
    if (*end != '\0' || port < 0 || port > 65535) {
        fprintf(stderr, "c_echo: bad port '%s'\n", argv[2]);
        return 2;
    }

    struct sockaddr_storage ss;
    socklen_t slen;
    memset(&ss, 0, sizeof ss);
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, argv[1], &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        slen = sizeof *s4;
    } else if (inet_pton(AF_INET6, argv[1], &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        slen = sizeof *s6;
    } else {
        fprintf(stderr, "c_echo: host must be an IP literal, got '%s'\n", argv[1]);
        return 2;
    }

    int fd = socket(ss.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && rcvbuf > 0) {
        (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    }
    if (fd < 0 || bind(fd, (struct sockaddr *)&ss, slen) < 0) {
        perror("c_echo: bind");
        return 1;
    }
    if (getsockname(fd, (struct sockaddr *)&ss, &slen) < 0) {
        perror("c_echo: getsockname");
        return 1;
    }
    int bound = ntohs(ss.ss_family == AF_INET ? s4->sin_port : s6->sin6_port);

    /* No SA_RESTART: a signal must interrupt the blocking recvmmsg. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    static char bufs[BATCH][2048];
    static struct iovec iov[BATCH];
    static struct sockaddr_storage peers[BATCH];
    static struct mmsghdr msgs[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &peers[i];
    }

    printf("READY %d\n", bound);
    fflush(stdout);

    unsigned long long count = 0;
    while (!stop_requested) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_len = sizeof bufs[i];
            msgs[i].msg_hdr.msg_namelen = sizeof peers[i];
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("c_echo: recvmmsg");
            continue;
        }
        count += (unsigned long long)n;
        if (!echo) continue;
        for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
        int off = 0;
        while (off < n) {
            int m = sendmmsg(fd, msgs + off, (unsigned)(n - off), 0);
            /* A failed datagram (peer gone) is skipped, not retried, so one
             * bad address cannot stall the rest of the batch. */
            off += m > 0 ? m : 1;
        }
    }
    printf("COUNT %llu\n", count);
    fflush(stdout);
    close(fd);
    return 0;
}
