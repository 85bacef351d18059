/* What waking an idle process through a loopback socket costs on this VM (issue 14's floors;
 * bench/wakeup.py runs it).
 *
 *   wakeup server PORT                    epoll_wait, read a byte, write it back (forever)
 *   wakeup client PORT PID N GAP_US       N pings, GAP_US apart (0: back to back), each
 *                                         waiting for its echo; prints the server's and
 *                                         its own on-CPU ns per ping (/proc/PID/schedstat)
 *                                         and the round trip's p50/p99 in us.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long on_cpu_ns(const char *pid) {
    char path[64];
    long long ns = 0;
    snprintf(path, sizeof path, "/proc/%s/schedstat", pid);
    FILE *f = fopen(path, "r");
    if (f) {
        if (fscanf(f, "%lld", &ns) != 1) ns = 0;
        fclose(f);
    }
    return ns;
}

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one = 1;
    char byte = 'x';
    if (strcmp(argv[1], "server") == 0) {
        int ls = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(ls, (struct sockaddr *)&addr, sizeof addr) || listen(ls, 4)) return 1;
        int s = accept(ls, NULL, NULL);
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        int ep = epoll_create1(0);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = s}, got;
        epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
        for (;;) {
            if (epoll_wait(ep, &got, 1, -1) != 1) continue;
            if (read(s, &byte, 1) != 1) return 0;
            if (write(s, &byte, 1) != 1) return 1;
        }
    }
    if (argc < 6) return 2;
    int n = atoi(argv[4]);
    long long gap = atoll(argv[5]) * 1000;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&addr, sizeof addr)) return 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    long long *rtt = calloc(n, sizeof *rtt);
    for (int i = 0; i < 100; i++) {  /* warm-up */
        if (write(s, &byte, 1) != 1 || read(s, &byte, 1) != 1) return 1;
    }
    long long srv0 = on_cpu_ns(argv[3]), me0 = on_cpu_ns("self"), due = now_ns();
    for (int i = 0; i < n; i++) {
        long long t = now_ns();
        if (write(s, &byte, 1) != 1 || read(s, &byte, 1) != 1) return 1;
        rtt[i] = now_ns() - t;
        if (gap) {
            due += gap;
            long long wait = due - now_ns();
            if (wait > 0) {
                struct timespec ts = {wait / 1000000000LL, wait % 1000000000LL};
                nanosleep(&ts, NULL);
            }
        }
    }
    long long srv = on_cpu_ns(argv[3]) - srv0, me = on_cpu_ns("self") - me0;
    qsort(rtt, n, sizeof *rtt, cmp);
    printf("{\"gap_us\": %lld, \"pings\": %d, \"server_us_per_wakeup\": %.1f, "
           "\"client_us_per_ping\": %.1f, \"rtt_p50_us\": %.1f, \"rtt_p99_us\": %.1f}\n",
           gap / 1000, n, srv / 1e3 / n, me / 1e3 / n, rtt[n / 2] / 1e3,
           rtt[(int)(0.99 * (n - 1))] / 1e3);
    return 0;
}
