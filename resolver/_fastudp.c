/* The batched UDP listener's memo-hit loop in C (resolver/service/udpbatch.py).

   One call reads up to `slots` datagrams with recvmmsg into the listener's buffers (the
   mmsghdr arrays that udpslots.Buffers built), answers each one the memo can answer
   without Python (the same checks as AnswerMemo.fast_answer and the listener's access
   check), and sends the answers with sendmmsg; it goes on for up to `rounds` reads while
   every datagram was answered and every read was full. Whatever it cannot decide is
   handed back: the indices of those datagrams (the listener runs its Python path on
   them), and the answers it could not send (the listener queues them).

   event() is the socket's readable callback itself: it reads what it needs of the
   listener and the memo, makes that call, and calls back into Python only for what needs
   it, so that an event the loop answers whole runs no Python frame at all.

   No Python code runs in here: the memo is a dict of bytes keys (looked up with the
   bytes of a datagram after its ID), the access list a set of str (looked up through the
   listener's IPv4 address cache, a dict of int to str); the GIL is held throughout (every
   system call is non-blocking). The per-entry counts go into two arrays indexed by the
   entry's slot (AnswerMemo.fast_counts, a count or -1 for an entry the fast path must not
   answer, and AnswerMemo.fast_times), which AnswerMemo.fold adds to the counters. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>

#include "_fastblock.h"

#define MAX_SLOTS 1024
#define NAME_SIZE 28 /* sizeof(struct sockaddr_in6), a sockaddr slot (udpbatch) */

static double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#define SEEN 16 /* senders whose access a call remembers (a power of two) */

/* What a call of the C loop has found out about its IPv4 senders, which come again and
   again in a batch: nothing Python can change runs during a call, so the access list
   and the address cache stay as they were. */
typedef struct {
    uint32_t addrs[SEEN];
    signed char verdicts[SEEN]; /* 0 not known, 1 let in, 2 Python's */
} Seen;

/* The IPv4 address of `sa` as udpbatch's address cache keys it (sin_addr in native
   order). */
static uint32_t
ipv4_of(const struct sockaddr *sa)
{
    uint32_t value;
    memcpy(&value, (const char *)sa + 4, 4);
    return value;
}

/* The host string the listener's address cache holds for the IPv4 `value` (borrowed),
   Py_None when it holds none yet, or NULL with an exception set. */
static PyObject *
cached_host(PyObject *hosts, uint32_t value)
{
    PyObject *key = PyLong_FromUnsignedLong(value);
    if (key == NULL)
        return NULL;
    PyObject *host = PyDict_GetItemWithError(hosts, key); /* borrowed */
    Py_DECREF(key);
    return host != NULL || PyErr_Occurred() ? host : Py_None;
}

/* Whether the sender of `hdr` is let in: 1 yes, 0 ask Python (an IPv6 sender, or an IPv4
   one not in the address cache yet, or not allowed: Python refuses it), -1 an error. */
static int
allowed(struct msghdr *hdr, PyObject *clients, PyObject *hosts, Seen *seen)
{
    if (clients == Py_None)
        return 1;
    struct sockaddr *sa = (struct sockaddr *)hdr->msg_name;
    if (sa->sa_family != AF_INET)
        return 0;
    uint32_t value = ipv4_of(sa);
    unsigned int at = (value ^ value >> 8 ^ value >> 16 ^ value >> 24) & (SEEN - 1);
    if (seen->verdicts[at] && seen->addrs[at] == value)
        return seen->verdicts[at] == 1;
    PyObject *host = cached_host(hosts, value);
    if (host == NULL)
        return -1;
    int verdict = host == Py_None ? 0 : PySet_Contains(clients, host);
    if (verdict >= 0) {
        seen->addrs[at] = value;
        seen->verdicts[at] = verdict ? 1 : 2;
    }
    return verdict;
}

typedef struct {
    PyObject *memo, *clients, *hosts;
    Py_buffer counts, times; /* int64 per slot, double per slot */
    Py_buffer misses;        /* uint16 per datagram */
    Py_buffer slow_slots, slow_times; /* int64, double per datagram: pauses */
    double now, bound;
    Py_ssize_t send_size;
    PyObject *fresh; /* list: (datagram, host or None, sockaddr, index) of those handed back */
    Blocks blocks;   /* blocked names not in the memo (_fastblock.c), when on */
    Py_ssize_t decided; /* answers made that way */
    Py_ssize_t max_entries, max_bytes; /* the memo's bounds (AnswerMemo) */
    Py_ssize_t used; /* the UDP memo's bytes (AnswerMemo.sizes[0]), once read (-1: not yet) */
    int dirty;       /* 1 when `used` changed and must be written back */
    Py_ssize_t evicted; /* memo entries evicted to make room (AnswerMemo.evictions) */
    Seen seen;
} Job;

/* Hand datagram i (not in the memo) to Python as it will need it: its bytes, its
   sender's host where the address cache has it (None: Python looks), its raw sockaddr
   (the address of a later answer) and its index (its sockaddr slot). 0, or -1 an error. */
static int
hand_over(Job *job, struct mmsghdr *in, int i)
{
    struct sockaddr *sa = (struct sockaddr *)in->msg_hdr.msg_name;
    PyObject *host = sa->sa_family == AF_INET ? cached_host(job->hosts, ipv4_of(sa)) : Py_None;
    if (host == NULL)
        return -1;
    PyObject *item = Py_BuildValue(
        "(y#Oy#i)", (const char *)in->msg_hdr.msg_iov->iov_base, (Py_ssize_t)in->msg_len,
        host, (const char *)sa, (Py_ssize_t)NAME_SIZE, i);
    if (item == NULL)
        return -1;
    int failed = PyList_Append(job->fresh, item);
    Py_DECREF(item);
    return failed;
}

/* Count an answer of the Info in `slot` sent by the C loop, `elapsed` seconds after it
   came: 1, or 2 for a pause (counted by Python, one by one, from slow_slots). */
static int
counted(Job *job, Py_ssize_t slot, double elapsed, Py_ssize_t *nslow)
{
    if (elapsed < job->bound) {
        ((int64_t *)job->counts.buf)[slot] += 1;
        ((double *)job->times.buf)[slot] += elapsed;
        return 1;
    }
    ((int64_t *)job->slow_slots.buf)[*nslow] = slot;
    ((double *)job->slow_times.buf)[*nslow] = elapsed;
    *nslow += 1;
    return 2;
}

/* AnswerMemo._make_room for an entry of `size` bytes: the memo's oldest entries evicted,
   1/share of it at a time (its insertion order: the start of the dict), until the entry
   is within the entry cap and the UDP half of the bytes. 1, or 0 when it may not join
   (the memo is off, or the entry would crowd out too many: Python's, which counts the
   rejection), -1 an error. */
static int
make_room(Job *job, Py_ssize_t size)
{
    PyObject *memo = job->memo;
    Py_ssize_t half = job->max_bytes / 2, share = job->blocks.share;
    if (job->max_entries <= 0 || half <= 0 || size * share > half)
        return 0;
    while (PyDict_GET_SIZE(memo) > 0
           && (PyDict_GET_SIZE(memo) >= job->max_entries || job->used + size > half)) {
        Py_ssize_t count = PyDict_GET_SIZE(memo) / share, pos = 0, taken = 0;
        if (count < 1)
            count = 1;
        PyObject *doomed = PyList_New(count), *key, *value;
        if (doomed == NULL)
            return -1;
        while (taken < count && PyDict_Next(memo, &pos, &key, &value)) {
            Py_ssize_t freed = 4 + job->blocks.overhead;
            if (PyTuple_CheckExact(value) && PyTuple_GET_SIZE(value) > 0
                && PyBytes_CheckExact(PyTuple_GET_ITEM(value, 0)))
                freed += 2 * PyBytes_GET_SIZE(PyTuple_GET_ITEM(value, 0));
            job->used -= freed; /* (as AnswerMemo.forget counts an entry) */
            PyList_SET_ITEM(doomed, taken++, Py_NewRef(key));
        }
        int failed = 0;
        for (Py_ssize_t k = 0; k < taken && !failed; k++)
            failed = PyDict_DelItem(memo, PyList_GET_ITEM(doomed, k)) < 0;
        Py_DECREF(doomed); /* (a list made full: any slot left NULL is skipped) */
        job->evicted += taken;
        job->dirty = 1;
        if (failed)
            return -1;
    }
    return 1;
}

/* Keep a blocked answer made here in the memo under `key`, as AnswerMemo.remember does
   (its repeats are then memo hits), making room as it would: 1, or 0 when it may not
   join (Python answers it), -1 an error. The memo's bytes are read once a call and
   written back at its end (save_used). */
static int
remember(Job *job, PyObject *key, const char *answer, Py_ssize_t length, double until,
         Py_ssize_t slot)
{
    if (until <= job->now)
        return 1; /* not to be kept (remember() keeps nothing either) */
    if (job->used < 0) {
        job->used = PyLong_AsSsize_t(PyList_GET_ITEM(job->blocks.sizes, 0));
        if (job->used == -1 && PyErr_Occurred())
            return -1;
    }
    Py_ssize_t size = 2 * length + job->blocks.overhead;
    if ((job->used + size) * 2 > job->max_bytes || PyDict_GET_SIZE(job->memo) >= job->max_entries) {
        int room = make_room(job, size);
        if (room <= 0)
            return room;
    }
    /* (answer after the ID, until, slot): the tuple of Memo, made without a format */
    PyObject *value = PyTuple_New(3);
    if (value == NULL)
        return -1;
    PyObject *body = PyBytes_FromStringAndSize(answer + 2, length - 2);
    PyObject *expiry = body ? PyFloat_FromDouble(until) : NULL;
    PyObject *index = expiry ? PyLong_FromSsize_t(slot) : NULL;
    PyTuple_SET_ITEM(value, 0, body ? body : Py_NewRef(Py_None));
    PyTuple_SET_ITEM(value, 1, expiry ? expiry : Py_NewRef(Py_None));
    PyTuple_SET_ITEM(value, 2, index ? index : Py_NewRef(Py_None));
    int failed = index == NULL || PyDict_SetItem(job->memo, key, value) < 0;
    Py_DECREF(value);
    if (failed)
        return -1;
    job->used += size;
    job->dirty = 1;
    return 1;
}

/* Write the memo's bytes back, if C kept or evicted entries: 0, or -1 an error. */
static int
save_used(Job *job)
{
    if (!job->dirty)
        return 0;
    job->dirty = 0;
    PyObject *total = PyLong_FromSsize_t(job->used);
    if (total == NULL)
        return -1;
    return PyList_SetItem(job->blocks.sizes, 0, total); /* (steals it) */
}

/* A datagram the memo does not hold (its key `key`): answered here when a list blocks
   it and _fastblock.c can answer it (see there), into send slot `out`, and kept in the
   memo; 1 or 2 as counted() says, 3 Python's (not in the memo), -1 an error. */
static int
answer_blocked(Job *job, PyObject *key, struct mmsghdr *in, struct mmsghdr *out,
               Py_ssize_t *nslow)
{
    if (!job->blocks.on)
        return 3;
    double started = monotonic();
    int access = allowed(&in->msg_hdr, job->clients, job->hosts, &job->seen);
    if (access <= 0)
        return access < 0 ? -1 : 3;
    Py_ssize_t slot = -1;
    double until = 0.0;
    char *answer = (char *)out->msg_hdr.msg_iov->iov_base;
    Py_ssize_t length = blocks_answer(
        &job->blocks, (const unsigned char *)in->msg_hdr.msg_iov->iov_base, (Py_ssize_t)in->msg_len,
        job->now, (unsigned char *)answer, job->send_size, &slot, &until);
    if (length <= 0)
        return length < 0 ? -1 : 3;
    if (slot < 0 || slot >= job->counts.len / 8 || slot >= job->times.len / 8
        || ((int64_t *)job->counts.buf)[slot] < 0)
        return 3; /* (a slot of an earlier memo, or an Info the audit log sees) */
    int kept = remember(job, key, answer, length, until, slot);
    if (kept <= 0)
        return kept < 0 ? -1 : 3;
    out->msg_hdr.msg_iov->iov_len = (size_t)length;
    out->msg_hdr.msg_name = in->msg_hdr.msg_name;
    job->decided++;
    return counted(job, slot, monotonic() - started, nslow);
}

/* Answer datagram i into send slot `*ready`, or hand it back. 1 answered, 0 handed
   back, 3 handed back and not in the memo (Python need not look again), 2 a pause
   (answered, noted in slow), -1 an error. */
static int
answer_one(Job *job, struct mmsghdr *in, struct mmsghdr *out, Py_ssize_t *nslow)
{
    Py_ssize_t size = in->msg_len;
    if (size <= 2)
        return 3;
    const char *data = (const char *)in->msg_hdr.msg_iov->iov_base;
    PyObject *key = PyBytes_FromStringAndSize(data + 2, size - 2);
    if (key == NULL)
        return -1;
    PyObject *hit = PyDict_GetItemWithError(job->memo, key); /* borrowed */
    if (hit == NULL) {
        int done = PyErr_Occurred() ? -1 : answer_blocked(job, key, in, out, nslow);
        Py_DECREF(key);
        return done;
    }
    Py_DECREF(key);
    double started = monotonic();
    if (!PyTuple_CheckExact(hit) || PyTuple_GET_SIZE(hit) < 3)
        return 0;
    PyObject *body = PyTuple_GET_ITEM(hit, 0);
    PyObject *until = PyTuple_GET_ITEM(hit, 1);
    PyObject *slot_obj = PyTuple_GET_ITEM(hit, 2);
    if (!PyBytes_CheckExact(body) || !PyFloat_CheckExact(until) || !PyLong_CheckExact(slot_obj))
        return 0;
    Py_ssize_t slot = PyLong_AsSsize_t(slot_obj);
    if (slot < 0 || slot >= job->counts.len / 8 || slot >= job->times.len / 8) {
        PyErr_Clear();
        return 0;
    }
    int64_t *counts = (int64_t *)job->counts.buf;
    if (counts[slot] < 0 || job->now >= PyFloat_AS_DOUBLE(until))
        return 0; /* an answer the audit log must see, or expired: Python's */
    Py_ssize_t length = PyBytes_GET_SIZE(body);
    if (length + 2 > job->send_size)
        return 0; /* sent on its own by Python */
    int access = allowed(&in->msg_hdr, job->clients, job->hosts, &job->seen);
    if (access <= 0)
        return access;
    char *slot_out = (char *)out->msg_hdr.msg_iov->iov_base;
    slot_out[0] = data[0];
    slot_out[1] = data[1];
    memcpy(slot_out + 2, PyBytes_AS_STRING(body), (size_t)length);
    out->msg_hdr.msg_iov->iov_len = (size_t)length + 2;
    out->msg_hdr.msg_name = in->msg_hdr.msg_name;
    return counted(job, slot, monotonic() - started, nslow);
}

static int
get_buffer(PyObject *obj, Py_buffer *view, const char *format, Py_ssize_t items)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
        return -1;
    if (view->format == NULL || strcmp(view->format, format) != 0 || view->len < items * view->itemsize) {
        PyBuffer_Release(view);
        view->obj = NULL;
        PyErr_Format(PyExc_ValueError, "expected a writable '%s' array of %zd items", format, items);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(serve_doc,
"serve(fd, recv_msgs, send_msgs, slots, rounds, send_size, memo, clients, hosts,\n"
"      counts, times, now, bound, misses, slow_slots, slow_times, send, fresh, blocks,\n"
"      max_entries, max_bytes)\n"
"-> (received, ready, sent, errno, missed, absent, slow, rounds, decided, evicted)\n\n"
"Read, answer from the memo and send, as the module's comment says. `received` is the\n"
"last recvmmsg's result (-1 with errno on failure), `ready` the answers in send slots\n"
"0.., `sent` how many of them went out (only tried when `send` is true and nothing was\n"
"handed back), `missed` the datagram indices at the start of `misses`, `absent` those\n"
"not in the memo, appended to the list `fresh` as (datagram, host or None, sockaddr,\n"
"index) in the order they came, `slow` the pauses in\n"
"`slow_slots`/`slow_times`, `rounds` the reads made. `blocks`: a view of the policy\n"
"(core/blockview.py) with which blocked names not in the memo are answered and kept\n"
"in it (within the memo's `max_entries` and `max_bytes`, evicting its oldest entries as\n"
"AnswerMemo does: `evicted` of them), or None; `decided` how many were answered that\n"
"way (counted in their Info's slot too).");

/* What one call of the loop reads and writes besides the Job. */
typedef struct {
    int fd, send;            /* the socket; whether answers may be sent now */
    struct mmsghdr *recv_msgs, *send_msgs;
    Py_ssize_t slots, rounds;
    int received, err;       /* the last recvmmsg's result, and errno */
    Py_ssize_t ready, sent, missed, absent, nslow, round;
} Io;

/* The Job's arrays and view, from the objects of the listener and the memo: 0, or -1
   with an exception set (close_job releases what was taken). */
static int
open_job(Job *job, PyObject *counts, PyObject *times, PyObject *misses, PyObject *slow_slots,
         PyObject *slow_times, PyObject *blocks, Py_ssize_t slots)
{
    if (!PyDict_CheckExact(job->memo) || !PyDict_CheckExact(job->hosts)
        || (job->clients != Py_None && !PyAnySet_Check(job->clients))
        || !PyList_CheckExact(job->fresh)) {
        PyErr_SetString(PyExc_TypeError,
                        "memo and hosts must be dicts, clients a set or None, fresh a list");
        return -1;
    }
    if (get_buffer(counts, &job->counts, "q", 0) < 0 || get_buffer(times, &job->times, "d", 0) < 0
        || get_buffer(misses, &job->misses, "H", slots) < 0
        || get_buffer(slow_slots, &job->slow_slots, "q", slots) < 0
        || get_buffer(slow_times, &job->slow_times, "d", slots) < 0
        || blocks_open(&job->blocks, blocks) < 0)
        return -1;
    return 0;
}

/* Write the memo's bytes back and release the Job's buffers: 0, or -1 (an exception). */
static int
close_job(Job *job)
{
    int failed = save_used(job);
    if (job->counts.obj) PyBuffer_Release(&job->counts);
    if (job->times.obj) PyBuffer_Release(&job->times);
    if (job->misses.obj) PyBuffer_Release(&job->misses);
    if (job->slow_slots.obj) PyBuffer_Release(&job->slow_slots);
    if (job->slow_times.obj) PyBuffer_Release(&job->slow_times);
    blocks_close(&job->blocks);
    return failed;
}

/* Read, answer and send, round after round, as serve() says: 0, or -1 (an exception). */
static int
run(Job *job, Io *io)
{
    uint16_t *misses = (uint16_t *)job->misses.buf;
    while (io->round < io->rounds) {
        io->round++;
        io->ready = io->sent = io->missed = io->absent = io->nslow = 0;
        io->received = recvmmsg(io->fd, io->recv_msgs, (unsigned int)io->slots, MSG_DONTWAIT, NULL);
        if (io->received <= 0) {
            io->err = io->received < 0 ? errno : 0;
            break;
        }
        for (int i = 0; i < io->received; i++) {
            int done = answer_one(job, &io->recv_msgs[i], &io->send_msgs[io->ready], &io->nslow);
            if (done < 0)
                return -1;
            if (done == 0)
                misses[io->missed++] = (uint16_t)i;
            else if (done == 3) {
                if (hand_over(job, &io->recv_msgs[i], i) < 0)
                    return -1;
                io->absent++;
            }
            else
                io->ready++;
        }
        if (io->missed || io->absent || io->nslow || !io->send)
            break; /* Python's turn: it answers these, then sends the batch */
        while (io->sent < io->ready) {
            int n = sendmmsg(io->fd, io->send_msgs + io->sent,
                             (unsigned int)(io->ready - io->sent), 0);
            if (n > 0) {
                io->sent += n;
                continue;
            }
            if (n < 0 && errno == EINTR)
                continue;
            io->err = n < 0 ? errno : 0;
            break;
        }
        if (io->sent < io->ready || io->received < io->slots)
            break;
    }
    return 0;
}

/* A tuple of `count` Py_ssize_t values, made without a format (Py_BuildValue's costs a
   call 1,300 instructions). */
static PyObject *
numbers(const Py_ssize_t *values, int count)
{
    PyObject *tuple = PyTuple_New(count);
    for (int k = 0; tuple != NULL && k < count; k++) {
        PyObject *item = PyLong_FromSsize_t(values[k]);
        if (item == NULL)
            Py_CLEAR(tuple);
        else
            PyTuple_SET_ITEM(tuple, k, item);
    }
    return tuple;
}

static PyObject *
serve(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 21) {
        PyErr_SetString(PyExc_TypeError, "serve() takes 21 arguments");
        return NULL;
    }
    Io io;
    memset(&io, 0, sizeof(io));
    io.fd = (int)PyLong_AsLong(args[0]);
    io.recv_msgs = (struct mmsghdr *)PyLong_AsVoidPtr(args[1]);
    io.send_msgs = (struct mmsghdr *)PyLong_AsVoidPtr(args[2]);
    io.slots = PyLong_AsSsize_t(args[3]);
    io.rounds = PyLong_AsSsize_t(args[4]);
    io.send = PyObject_IsTrue(args[16]);
    Job job;
    memset(&job, 0, sizeof(job));
    job.used = -1;
    job.send_size = PyLong_AsSsize_t(args[5]);
    job.memo = args[6];
    job.clients = args[7];
    job.hosts = args[8];
    job.now = PyFloat_AsDouble(args[11]);
    job.bound = PyFloat_AsDouble(args[12]);
    job.fresh = args[17];
    job.max_entries = PyLong_AsSsize_t(args[19]);
    job.max_bytes = PyLong_AsSsize_t(args[20]);
    if (PyErr_Occurred())
        return NULL;
    if (io.slots <= 0 || io.slots > MAX_SLOTS || io.rounds <= 0 || io.recv_msgs == NULL
        || io.send_msgs == NULL) {
        PyErr_SetString(PyExc_ValueError, "bad slots, rounds or buffers");
        return NULL;
    }
    PyObject *result = NULL;
    if (open_job(&job, args[9], args[10], args[13], args[14], args[15], args[18], io.slots) == 0
        && run(&job, &io) == 0) {
        Py_ssize_t fields[10] = {io.received, io.ready, io.sent, io.err, io.missed,
                                 io.absent, io.nslow, io.round, job.decided, job.evicted};
        result = numbers(fields, 10);
    }
    if (close_job(&job) < 0)
        Py_CLEAR(result);
    return result;
}

/* Names the event handler uses, interned once (PyInit). */
static PyObject *s_readable, *s_after, *s_failed, *s_fast_decided, *s_evictions, *s_recv_error,
    *s_event_error;

static int
intern_names(void)
{
    struct { PyObject **slot; const char *text; } names[] = {
        {&s_readable, "_readable"}, {&s_after, "_after"}, {&s_failed, "_serve_failed"},
        {&s_fast_decided, "fast_decided"}, {&s_evictions, "evictions"},
        {&s_recv_error, "_recv_error"}, {&s_event_error, "_event_error"},
    };
    for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++)
        if ((*names[k].slot = PyUnicode_InternFromString(names[k].text)) == NULL)
            return -1;
    return 0;
}

/* obj.name += amount: 0, or -1 (an exception). */
static int
add_to(PyObject *obj, PyObject *name, Py_ssize_t amount)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    PyObject *step = value ? PyLong_FromSsize_t(amount) : NULL;
    PyObject *sum = step ? PyNumber_Add(value, step) : NULL;
    int failed = sum == NULL || PyObject_SetAttr(obj, name, sum) < 0;
    Py_XDECREF(value);
    Py_XDECREF(step);
    Py_XDECREF(sum);
    return failed ? -1 : 0;
}

/* The exception raised is handed to the listener's method `name` (it logs the cause),
   and the event ends quietly. */
static PyObject *
hand_error(PyObject *listener, PyObject *name)
{
    PyObject *type, *value, *trace;
    PyErr_Fetch(&type, &value, &trace);
    PyErr_NormalizeException(&type, &value, &trace);
    if (value != NULL && trace != NULL)
        PyException_SetTraceback(value, trace);
    PyObject *told = PyObject_CallMethodOneArg(listener, name, value ? value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(trace);
    return told;
}

/* The C loop failed (out of memory, say): the listener logs the cause and answers with
   the Python loop from then on. */
static PyObject *
failed(PyObject *listener)
{
    return hand_error(listener, s_failed);
}

/* event()'s argument, made once by udpbatch.BatchListener: fd, recv and send pointers,
   slots, rounds, send size, the address cache, the list of fresh datagrams, misses, slow
   slots, slow times, EVERYONE, the bound, the listener, its queue of answers waiting to
   be sent, the memo's fast_state list (by the S_ indices of core/memo.py), the memo. */
#define FIXED 17
enum { F_FD, F_RECV, F_SEND, F_SLOTS, F_ROUNDS, F_SEND_SIZE, F_HOSTS, F_FRESH, F_MISSES,
       F_SLOW_SLOTS, F_SLOW_TIMES, F_EVERYONE, F_BOUND, F_LISTENER, F_QUEUE, F_STATE, F_FAST };
#define STATE 8
enum { S_MEMO, S_CLIENTS, S_COUNTS, S_TIMES, S_BLOCKS, S_MAX_ENTRIES, S_MAX_BYTES, S_CLOCK };

PyDoc_STRVAR(event_doc,
"event(fixed) -> None\n\n"
"A readable event of a udpbatch.BatchListener served by the C loop, without a Python\n"
"frame: what _readable, _batches and _fast_batches do when nothing needs Python. Its\n"
"argument (FIXED above) holds all it reads, the memo's state as a list that the memo's\n"
"properties keep current, so it looks up no attribute. The listener makes _readable the\n"
"reader instead when the C loop may not serve (shutting down, a failed C loop); this\n"
"calls _readable itself when the memo has no fast path (no fast memo, an access list\n"
"that is not a set). It calls back only for what needs Python: _after(ready, sent,\n"
"missed, absent, slow) for what it handed back, _recv_error(errno), _serve_failed\n"
"(exception) when the loop failed, and _event_error(exception) for any other fault (the\n"
"event is lost, never the listener).");

static PyObject *
event(PyObject *Py_UNUSED(module), PyObject *fixed)
{
    if (!PyTuple_CheckExact(fixed) || PyTuple_GET_SIZE(fixed) != FIXED
        || !PyList_CheckExact(PyTuple_GET_ITEM(fixed, F_STATE))
        || PyList_GET_SIZE(PyTuple_GET_ITEM(fixed, F_STATE)) != STATE) {
        PyErr_SetString(PyExc_TypeError, "event: expected the listener's tuple (FIXED)");
        return NULL;
    }
    PyObject *listener = PyTuple_GET_ITEM(fixed, F_LISTENER);
    PyObject *state = PyTuple_GET_ITEM(fixed, F_STATE);
    PyObject *memo = PyList_GET_ITEM(state, S_MEMO);
    PyObject *clients = PyList_GET_ITEM(state, S_CLIENTS);
    if (!PyDict_CheckExact(memo)
        || (clients != PyTuple_GET_ITEM(fixed, F_EVERYONE) && !PySet_CheckExact(clients)))
        return PyObject_CallMethodNoArgs(listener, s_readable);

    PyObject *result = NULL, *fast = PyTuple_GET_ITEM(fixed, F_FAST);
    /* (The list's items are borrowed: nothing below runs Python until the job is closed,
       but the clock, which may; so what the job uses is held.) */
    PyObject *held[STATE];
    for (int k = 0; k < STATE; k++)
        held[k] = Py_NewRef(PyList_GET_ITEM(state, k));
    memo = held[S_MEMO];
    clients = held[S_CLIENTS];
    PyObject *now = PyObject_CallNoArgs(held[S_CLOCK]);
    if (now == NULL)
        goto end;

    Io io;
    memset(&io, 0, sizeof(io));
    io.fd = (int)PyLong_AsLong(PyTuple_GET_ITEM(fixed, F_FD));
    io.recv_msgs = (struct mmsghdr *)PyLong_AsVoidPtr(PyTuple_GET_ITEM(fixed, F_RECV));
    io.send_msgs = (struct mmsghdr *)PyLong_AsVoidPtr(PyTuple_GET_ITEM(fixed, F_SEND));
    io.slots = PyLong_AsSsize_t(PyTuple_GET_ITEM(fixed, F_SLOTS));
    io.rounds = PyLong_AsSsize_t(PyTuple_GET_ITEM(fixed, F_ROUNDS));
    Py_ssize_t waiting = PyObject_Size(PyTuple_GET_ITEM(fixed, F_QUEUE));
    io.send = waiting == 0;
    Job job;
    memset(&job, 0, sizeof(job));
    job.used = -1;
    job.send_size = PyLong_AsSsize_t(PyTuple_GET_ITEM(fixed, F_SEND_SIZE));
    job.memo = memo;
    job.clients = clients == PyTuple_GET_ITEM(fixed, F_EVERYONE) ? Py_None : clients;
    job.hosts = PyTuple_GET_ITEM(fixed, F_HOSTS);
    job.fresh = PyTuple_GET_ITEM(fixed, F_FRESH);
    job.now = PyFloat_AsDouble(now);
    Py_DECREF(now);
    job.bound = PyFloat_AsDouble(PyTuple_GET_ITEM(fixed, F_BOUND));
    job.max_entries = PyLong_AsSsize_t(held[S_MAX_ENTRIES]);
    job.max_bytes = PyLong_AsSsize_t(held[S_MAX_BYTES]);
    if (waiting < 0 || PyErr_Occurred() || io.slots <= 0 || io.slots > MAX_SLOTS
        || io.rounds <= 0 || io.recv_msgs == NULL || io.send_msgs == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bad slots, rounds or buffers");
        result = failed(listener);
        goto end;
    }
    int ran = open_job(&job, held[S_COUNTS], held[S_TIMES], PyTuple_GET_ITEM(fixed, F_MISSES),
                       PyTuple_GET_ITEM(fixed, F_SLOW_SLOTS), PyTuple_GET_ITEM(fixed, F_SLOW_TIMES),
                       held[S_BLOCKS], io.slots);
    ran = ran == 0 ? run(&job, &io) : -1;
    if (close_job(&job) < 0 || ran < 0
        || (job.decided && (add_to(fast, s_fast_decided, job.decided) < 0
                            || add_to(fast, s_evictions, job.evicted) < 0))) {
        result = failed(listener);
        goto end;
    }
    if (io.received < 0) {
        PyObject *code = PyLong_FromLong(io.err);
        if (code != NULL)
            result = PyObject_CallMethodOneArg(listener, s_recv_error, code);
        Py_XDECREF(code);
    }
    else if (io.received > 0 && (io.nslow || io.missed || io.absent || io.sent < io.ready)) {
        Py_ssize_t rest[5] = {io.ready, io.sent, io.missed, io.absent, io.nslow};
        PyObject *values = numbers(rest, 5);
        PyObject *after = values ? PyObject_GetAttr(listener, s_after) : NULL;
        if (after != NULL)
            result = PyObject_CallObject(after, values);
        Py_XDECREF(after);
        Py_XDECREF(values);
    }
    else
        result = Py_NewRef(Py_None);
end:
    if (result == NULL && PyErr_Occurred()) /* (a fault around the loop: logged, no more) */
        result = hand_error(listener, s_event_error);
    for (int k = 0; k < STATE; k++)
        Py_DECREF(held[k]);
    return result;
}

PyDoc_STRVAR(dotted_doc,
"dotted(key, labels) -> bytes\n\n"
"policy.model.dotted in C: the dotted lower-case form of the wire name `key`, label\n"
"offsets `labels` unchanged (a length byte becomes the dot before its label, a dot\n"
"inside a label 0xFF). A copy the policy makes for every query it decides.");

static PyObject *
dotted(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "dotted() takes a bytes key and a tuple of offsets");
        return NULL;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t n = size > 1 ? size - 2 : 0;
    if (n < 0)
        n = 0; /* a two-byte key: key[1:-1] is empty, as in Python */
    PyObject *text = PyBytes_FromStringAndSize(size > 1 ? PyBytes_AS_STRING(args[0]) + 1 : "", n);
    if (text == NULL)
        return NULL;
    char *buf = PyBytes_AS_STRING(text);
    for (Py_ssize_t i = 0; i < n; i++)
        if (buf[i] == '.')
            buf[i] = (char)0xFF;
    Py_ssize_t count = PyTuple_GET_SIZE(args[1]);
    for (Py_ssize_t k = 1; k < count; k++) {
        Py_ssize_t off = PyLong_AsSsize_t(PyTuple_GET_ITEM(args[1], k));
        if (off == -1 && PyErr_Occurred()) {
            Py_DECREF(text);
            return NULL;
        }
        if (off < 1 || off > n) {
            Py_DECREF(text);
            PyErr_SetString(PyExc_IndexError, "a label offset outside the name");
            return NULL;
        }
        buf[off - 1] = '.';
    }
    return text;
}

PyDoc_STRVAR(send_doc,
"send(fd, answers) -> (sent, errno)\n\n"
"Send the answers of `answers`, a list of (answer, sockaddr) tuples, each to its raw\n"
"sockaddr, with sendmmsg from the bytes where they are (no copy into slots). An answer\n"
"the system refuses for itself (its address, its size) is skipped and counted as sent;\n"
"the first failure that concerns the socket (EAGAIN, ENOBUFS, a refusal) stops the\n"
"sending: `sent` answers went out (or were skipped), `errno` says why the rest did not.");

#define SEND_BATCH 64

static PyObject *
send_answers(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "send() takes a descriptor and a list");
        return NULL;
    }
    int fd = (int)PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    PyObject *answers = args[1];
    Py_ssize_t total = PyList_GET_SIZE(answers), sent = 0;
    int err = 0;
    struct mmsghdr msgs[SEND_BATCH];
    struct iovec iovs[SEND_BATCH];
    while (sent < total && err == 0) {
        Py_ssize_t count = total - sent < SEND_BATCH ? total - sent : SEND_BATCH;
        memset(msgs, 0, sizeof(msgs[0]) * (size_t)count);
        for (Py_ssize_t k = 0; k < count; k++) {
            PyObject *item = PyList_GET_ITEM(answers, sent + k);
            if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2
                || !PyBytes_CheckExact(PyTuple_GET_ITEM(item, 0))
                || !PyBytes_CheckExact(PyTuple_GET_ITEM(item, 1))
                || PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 1)) < (Py_ssize_t)sizeof(struct sockaddr_in)) {
                PyErr_SetString(PyExc_TypeError, "answers must be (bytes, sockaddr bytes) tuples");
                return NULL;
            }
            PyObject *answer = PyTuple_GET_ITEM(item, 0), *name = PyTuple_GET_ITEM(item, 1);
            iovs[k].iov_base = PyBytes_AS_STRING(answer);
            iovs[k].iov_len = (size_t)PyBytes_GET_SIZE(answer);
            msgs[k].msg_hdr.msg_iov = &iovs[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
            msgs[k].msg_hdr.msg_name = PyBytes_AS_STRING(name);
            msgs[k].msg_hdr.msg_namelen = (socklen_t)PyBytes_GET_SIZE(name);
        }
        Py_ssize_t done = 0;
        while (done < count) {
            int n = sendmmsg(fd, msgs + done, (unsigned int)(count - done), 0);
            if (n > 0) {
                done += n;
                continue;
            }
            int code = n < 0 ? errno : EAGAIN;
            if (code == EINTR)
                continue;
            if (code == EAGAIN || code == EWOULDBLOCK || code == ENOBUFS || code == ENOSYS
                || code == EPERM || code == EACCES) {
                err = code; /* the socket's trouble: the rest waits (or is dropped) */
                break;
            }
            done += 1; /* this answer's own trouble: dropped, as one sendto would be */
        }
        sent += done;
    }
    return Py_BuildValue("(ni)", sent, err);
}

PyDoc_STRVAR(blocked_doc,
"blocked(blocks, datagram, now) -> (answer, slot) or None\n\n"
"What the C loop answers to `datagram` when the memo does not hold it: the blocked\n"
"answer from `blocks` (core/blockview.py) and the Info slot it is counted in, or None\n"
"when Python answers it. For tests, which compare it with Python's answer.");

static PyObject *
blocked(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "blocked() takes a view, a bytes datagram and a time");
        return NULL;
    }
    double now = PyFloat_AsDouble(args[2]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    Blocks blocks;
    if (blocks_open(&blocks, args[0]) < 0)
        return NULL;
    unsigned char out[4096];
    Py_ssize_t slot = -1;
    double until = 0.0;
    Py_ssize_t length = blocks_answer(&blocks, (const unsigned char *)PyBytes_AS_STRING(args[1]),
                                      PyBytes_GET_SIZE(args[1]), now, out, sizeof(out), &slot,
                                      &until);
    blocks_close(&blocks);
    if (length < 0)
        return NULL;
    if (length == 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(y#n)", (const char *)out, length, slot);
}

static PyMethodDef methods[] = {
    {"blocked", (PyCFunction)(void (*)(void))blocked, METH_FASTCALL, blocked_doc},
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL, serve_doc},
    {"event", (PyCFunction)event, METH_O, event_doc},
    {"send", (PyCFunction)(void (*)(void))send_answers, METH_FASTCALL, send_doc},
    {"dotted", (PyCFunction)(void (*)(void))dotted, METH_FASTCALL, dotted_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "resolver._fastudp",
    "The batched UDP listener's memo-hit loop in C (see resolver/service/udpbatch.py).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__fastudp(void)
{
    blocks_init();
    if (intern_names() < 0)
        return NULL;
    return PyModule_Create(&module);
}
