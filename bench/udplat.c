/* udplat: UDP query latency at a fixed offered rate, for bench/core_bench.py.

   dnsperf 2.10 has no latency histogram; its -v prints a line per answer, and at tens of
   thousands of queries a second that printing, and its pacing in bursts, are most of the
   latency it reports (Unbound's p99 read 2.1-2.6 ms at 50,000 qps). This sends one query
   every 1/rate seconds from one busy thread (no sleeps: the next send time is polled), on
   `clients` sockets in turn, reads answers as they come, and times each against its own
   send with CLOCK_MONOTONIC. Meant to run on a core of its own (core_bench pins it).

   udplat ADDRESS PORT DATAFILE RATE SECONDS CLIENTS LOOP
   DATAFILE: "name type" lines as dnsperf reads them (A, AAAA, TXT...), sent in turn, over
   and over when LOOP is 1, once when 0 (dnsperf -n 1). Prints one JSON object: sent,
   answered, lost, the rate offered, p50/p99/p999/max in ms (-1: over 1% or 0.1% lost
   or later than 1 s), the answers' rcodes, and this loop's own pauses over 100 us (the
   kernel or the hypervisor preempted it: answers waited for it, not for the server). Every run is bounded: SECONDS of sending,
   then at most 1 s for the last answers. */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CLIENTS 64
#define MAX_QUERIES 10000000
#define QUERY_ROOM 272
#define BUCKET_NS 1000       /* a bucket of the histogram: 1 us */
#define BUCKETS 1000000      /* up to 1 s */
#define DRAIN_NS 1000000000L /* how long the last answers may take */

static uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int
qtype_of(const char *text)
{
    static const struct { const char *name; int code; } types[] = {
        {"A", 1}, {"NS", 2}, {"CNAME", 5}, {"SOA", 6}, {"PTR", 12}, {"MX", 15},
        {"TXT", 16}, {"AAAA", 28}, {"SRV", 33}, {"HTTPS", 65},
    };
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
        if (strcasecmp(text, types[i].name) == 0)
            return types[i].code;
    return -1;
}

/* A query for `name` of type `qtype` after a 2-byte ID left 0: RD set, no EDNS (as
   dnsperf without -e). Its length, or -1 for a name that cannot be one. */
static int
make_query(const char *name, int qtype, unsigned char *out, size_t room)
{
    static const unsigned char header[12] = {0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0};
    if (room < 12 + 255 + 4)
        return -1;
    memcpy(out, header, 12);
    size_t at = 12;
    const char *p = name;
    while (*p && !(p[0] == '.' && p[1] == 0)) {
        const char *dot = strchr(p, '.');
        size_t len = dot ? (size_t)(dot - p) : strlen(p);
        if (len == 0 || len > 63 || at + 1 + len > 12 + 254)
            return -1;
        out[at++] = (unsigned char)len;
        memcpy(out + at, p, len);
        at += len;
        p += len + (dot ? 1 : 0);
    }
    out[at++] = 0;
    out[at++] = (unsigned char)(qtype >> 8);
    out[at++] = (unsigned char)qtype;
    out[at++] = 0;
    out[at++] = 1;
    return (int)at;
}

static double
percentile_ms(const uint32_t *hist, uint64_t total, double q)
{
    uint64_t rank = (uint64_t)(q * (double)total + 0.999999);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (long b = 0; b < BUCKETS; b++) {
        seen += hist[b];
        if (seen >= rank)
            return (double)(b + 1) * BUCKET_NS / 1e6; /* the bucket's upper edge */
    }
    return -1.0; /* beyond the histogram (or lost): reported as such */
}

int
main(int argc, char **argv)
{
    if (argc != 8) {
        fprintf(stderr, "usage: udplat ADDRESS PORT DATAFILE RATE SECONDS CLIENTS LOOP\n");
        return 2;
    }
    struct sockaddr_in server = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &server.sin_addr) != 1) {
        fprintf(stderr, "udplat: bad address %s\n", argv[1]);
        return 2;
    }
    long rate = atol(argv[4]), seconds = atol(argv[5]), clients = atol(argv[6]);
    int loop = atoi(argv[7]) != 0;
    if (rate < 1 || rate > 2000000 || seconds < 1 || seconds > 600 || clients < 1
        || clients > MAX_CLIENTS) {
        fprintf(stderr, "udplat: rate 1..2000000, seconds 1..600, clients 1..%d\n", MAX_CLIENTS);
        return 2;
    }
    FILE *file = fopen(argv[3], "r");
    if (file == NULL) {
        perror(argv[3]);
        return 2;
    }
    unsigned char (*queries)[QUERY_ROOM] = NULL;
    int *lengths = NULL;
    int count = 0, room = 0;
    char line[512];
    while (count < MAX_QUERIES && fgets(line, sizeof(line), file)) {
        if (count == room) {
            room = room ? 2 * room : 4096;
            queries = realloc(queries, (size_t)room * QUERY_ROOM);
            lengths = realloc(lengths, (size_t)room * sizeof(int));
            if (queries == NULL || lengths == NULL) {
                fprintf(stderr, "udplat: out of memory\n");
                return 2;
            }
        }
        char name[300], type[32];
        if (sscanf(line, "%299s %31s", name, type) != 2)
            continue;
        int qtype = qtype_of(type);
        int length = qtype < 0 ? -1 : make_query(name, qtype, queries[count], sizeof(queries[0]));
        if (length < 0) {
            fprintf(stderr, "udplat: cannot send %s", line);
            return 2;
        }
        lengths[count++] = length;
    }
    fclose(file);
    if (count == 0) {
        fprintf(stderr, "udplat: no queries in %s\n", argv[3]);
        return 2;
    }

    int socks[MAX_CLIENTS];
    for (long c = 0; c < clients; c++) {
        socks[c] = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        int size = 4 << 20;
        setsockopt(socks[c], SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
        if (socks[c] < 0 || connect(socks[c], (struct sockaddr *)&server, sizeof(server)) < 0) {
            perror("udplat: socket");
            return 2;
        }
    }
    /* When each outstanding query (socket, ID) was sent; 0: none outstanding. */
    uint64_t *sent_at = calloc((size_t)clients * 65536, sizeof(uint64_t));
    uint32_t *hist = calloc(BUCKETS, sizeof(uint32_t));
    if (sent_at == NULL || hist == NULL) {
        fprintf(stderr, "udplat: out of memory\n");
        return 2;
    }
    uint64_t interval = 1000000000u / (uint64_t)rate, start = now_ns();
    uint64_t stop = start + (uint64_t)seconds * 1000000000u, next = start;
    uint64_t sent = 0, answered = 0, late_ids = 0, errors = 0, max_ns = 0;
    uint64_t rcodes[16] = {0};
    /* Pauses of this loop itself (preempted: by the kernel or the hypervisor), which
       delay the answers waiting for it as a slow server would: over 100 us, their sum. */
    uint64_t stalls = 0, stalled_ns = 0, last = start;
    uint16_t ids[MAX_CLIENTS] = {0};
    unsigned char reply[4096];
    long turn = 0;
    int q = 0;
    while (1) {
        uint64_t now = now_ns();
        if (now - last > 100000) {
            stalls++;
            stalled_ns += now - last;
        }
        last = now;
        if (now < stop && (loop || q < count)) {
            while (next <= now && (loop || q < count)) { /* behind: catch up */
                long c = turn++ % clients;
                uint16_t id = ids[c]++;
                unsigned char *query = queries[q];
                query[0] = (unsigned char)(id >> 8);
                query[1] = (unsigned char)id;
                uint64_t *slot = &sent_at[(size_t)c * 65536 + id];
                if (*slot)
                    late_ids++; /* an ID still outstanding after 65,536 more: lost */
                *slot = now_ns();
                if (send(socks[c], query, (size_t)lengths[q], 0) < 0) {
                    *slot = 0;
                    errors++;
                }
                else
                    sent++;
                q = loop ? (q + 1) % count : q + 1;
                next += interval;
            }
        }
        else {
            if (stop > now)
                stop = now; /* (the file ran out) */
            if (answered >= sent || now >= stop + DRAIN_NS)
                break;
        }
        for (long c = 0; c < clients; c++) {
            while (1) {
                ssize_t n = recv(socks[c], reply, sizeof(reply), 0);
                if (n < 0)
                    break;
                uint64_t got = now_ns();
                if (n < 12)
                    continue;
                uint16_t id = (uint16_t)(reply[0] << 8 | reply[1]);
                uint64_t *slot = &sent_at[(size_t)c * 65536 + id];
                if (*slot == 0)
                    continue; /* a duplicate, or an answer to a query given up */
                uint64_t took = got - *slot;
                *slot = 0;
                answered++;
                rcodes[reply[3] & 0x0F]++;
                if (took > max_ns)
                    max_ns = took;
                uint64_t bucket = took / BUCKET_NS;
                if (bucket < BUCKETS)
                    hist[bucket]++; /* (later: past every percentile, as a loss is) */
            }
        }
    }
    uint64_t lost = sent - answered;
    /* Lost queries count as infinitely late: past 1% lost, p99 is not a number. */
    double p50 = percentile_ms(hist, sent, 0.50);
    double p99 = lost * 100 > sent ? -1.0 : percentile_ms(hist, sent, 0.99);
    double p999 = lost * 1000 > sent ? -1.0 : percentile_ms(hist, sent, 0.999);
    static const char *names[16] = {"NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP",
                                    "REFUSED", "YXDOMAIN", "YXRRSET", "NXRRSET", "NOTAUTH",
                                    "NOTZONE", "RCODE11", "RCODE12", "RCODE13", "RCODE14",
                                    "RCODE15"};
    printf("{\"sent\": %llu, \"answered\": %llu, \"lost\": %llu, \"send_errors\": %llu, "
           "\"reused_ids\": %llu, \"rate\": %.1f, \"p50_ms\": %.4f, \"p99_ms\": %.4f, "
           "\"p999_ms\": %.4f, \"max_ms\": %.4f, \"stalls\": %llu, \"stalled_ms\": %.3f, "
           "\"rcodes\": {",
           (unsigned long long)sent, (unsigned long long)answered, (unsigned long long)lost,
           (unsigned long long)errors, (unsigned long long)late_ids,
           stop > start ? (double)sent * 1e9 / (double)(stop - start) : 0.0, p50, p99, p999,
           (double)max_ns / 1e6, (unsigned long long)stalls, (double)stalled_ns / 1e6);
    const char *comma = "";
    for (int r = 0; r < 16; r++)
        if (rcodes[r]) {
            printf("%s\"%s\": %llu", comma, names[r], (unsigned long long)rcodes[r]);
            comma = ", ";
        }
    printf("}}\n");
    return 0;
}
