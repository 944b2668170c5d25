/* Blocked names answered in C: Policy.decide and sinkhole.blocked_answer for the plain
   case, so that a name the UDP loop (_fastudp.c) has not seen yet and a list blocks is
   answered without entering the interpreter.

   What it reads is a view of the policy that resolver/core/blockview.py builds (the name
   table's arrays as they are, the rule sets' windows and flags in arrays, their answers'
   parts in tuples). Anything it is not sure of is left to Python, which then answers as
   it always does: a query that is not plain (not one question of class IN with at most an
   OPT record without options, EDNS version 0), a name that is not blocked (allowed, in a
   monitor phase, not listed), type ANY and the other meta types, an answer too large for
   the client's UDP size, and a kind of answer (rule set, type, rcode) whose Info Python
   has not made yet: blockview registers it the first time Python answers one, and from
   then on the C loop counts such answers in that Info's slot. The answer goes into the
   memo too (_fastudp.c, remember), until the instant blocks_answer says. */

#include "_fastblock.h"

#include <string.h>

#define MAX_NAME 255
#define MAX_LABELS 128
#define TYPE_A 1
#define TYPE_SOA 6
#define TYPE_AAAA 28
#define TYPE_OPT 41
#define EDNS_PAYLOAD 1232
#define MULTI 0x80000000u

enum { KIND_NXDOMAIN, KIND_NODATA, KIND_REFUSED, KIND_NULL, KIND_SINKHOLE };

/* An octet of a label as policy.model.dotted keeps it: lower case, a dot 0xFF. */
static unsigned char folded[256];

void
blocks_init(void)
{
    for (int c = 0; c < 256; c++)
        folded[c] = (unsigned char)(c >= 'A' && c <= 'Z' ? c + 32 : c == '.' ? 0xFF : c);
}

static int
open_array(PyObject *obj, Py_buffer *view, const char *format)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_FORMAT) < 0)
        return -1;
    if (view->format == NULL || strcmp(view->format, format) != 0) {
        PyBuffer_Release(view);
        view->obj = NULL;
        PyErr_Format(PyExc_TypeError, "blocks: expected a '%s' array", format);
        return -1;
    }
    return 0;
}

int
blocks_open(Blocks *b, PyObject *view)
{
    memset(b, 0, sizeof(*b));
    b->last_kind = -1;
    if (view == Py_None)
        return 0;
    if (!PyTuple_CheckExact(view) || PyTuple_GET_SIZE(view) != 10) {
        PyErr_SetString(PyExc_TypeError, "blocks: expected a tuple of 10 (blockview.View)");
        return -1;
    }
    PyObject *depths = PyTuple_GET_ITEM(view, 2), *consts = PyTuple_GET_ITEM(view, 8);
    b->multi = PyTuple_GET_ITEM(view, 5);
    b->answers = PyTuple_GET_ITEM(view, 6);
    b->slots = PyTuple_GET_ITEM(view, 7);
    b->sizes = PyTuple_GET_ITEM(view, 9);
    if (!PyBytes_CheckExact(depths) || PyBytes_GET_SIZE(depths) != 32 || !PyTuple_CheckExact(b->multi)
        || !PyTuple_CheckExact(b->answers) || !PyDict_CheckExact(b->slots)
        || !PyList_CheckExact(b->sizes) || PyList_GET_SIZE(b->sizes) < 1
        || !PyTuple_CheckExact(consts) || PyTuple_GET_SIZE(consts) != 5) {
        PyErr_SetString(PyExc_TypeError, "blocks: a part of the view is not what it should be");
        return -1;
    }
    b->depths = (const unsigned char *)PyBytes_AS_STRING(depths);
    b->exact = PyLong_AsLongLong(PyTuple_GET_ITEM(consts, 0));
    b->subdomains = PyLong_AsLongLong(PyTuple_GET_ITEM(consts, 1));
    b->allow = PyLong_AsLongLong(PyTuple_GET_ITEM(consts, 2));
    b->overhead = PyLong_AsSsize_t(PyTuple_GET_ITEM(consts, 3));
    b->share = PyLong_AsSsize_t(PyTuple_GET_ITEM(consts, 4));
    if (PyErr_Occurred())
        return -1;
    if (b->share < 1) {
        PyErr_SetString(PyExc_ValueError, "blocks: an eviction share below 1");
        return -1;
    }
    if (open_array(PyTuple_GET_ITEM(view, 0), &b->keys, "Q") < 0
        || open_array(PyTuple_GET_ITEM(view, 1), &b->values, "I") < 0
        || open_array(PyTuple_GET_ITEM(view, 3), &b->times, "d") < 0
        || open_array(PyTuple_GET_ITEM(view, 4), &b->flags, "q") < 0) {
        blocks_close(b);
        return -1;
    }
    b->size = b->keys.len / 8;
    b->rows = PyTuple_GET_SIZE(b->answers);
    if (b->size < 8 || (b->size & (b->size - 1)) || b->values.len / 4 != b->size
        || b->times.len / 8 < 3 * b->rows || b->flags.len / 8 < 2 * b->rows) {
        blocks_close(b);
        PyErr_SetString(PyExc_ValueError, "blocks: arrays of the wrong sizes");
        return -1;
    }
    b->on = 1;
    return 0;
}

void
blocks_close(Blocks *b)
{
    if (b->keys.obj) PyBuffer_Release(&b->keys);
    if (b->values.obj) PyBuffer_Release(&b->values);
    if (b->times.obj) PyBuffer_Release(&b->times);
    if (b->flags.obj) PyBuffer_Release(&b->flags);
    b->on = 0;
}

/* The value the name table holds for `name`, or -1 (NameTable.get). */
static int64_t
lookup(Blocks *b, const unsigned char *name, Py_ssize_t length)
{
    uint64_t h = (uint64_t)_Py_HashBytes(name, length);
    if (h == 0)
        h = 1;
    const uint64_t *keys = (const uint64_t *)b->keys.buf;
    const uint32_t *values = (const uint32_t *)b->values.buf;
    uint64_t mask = (uint64_t)b->size - 1, i = h & mask;
    for (Py_ssize_t probes = 0; probes < b->size; probes++) {
        uint64_t k = keys[i];
        if (k == h)
            return values[i];
        if (k == 0)
            return -1;
        i = (i + 1) & mask;
    }
    return -1;
}

typedef struct {
    Py_ssize_t block, where; /* the rule set that blocks (-1: none), its label offset */
    int allowed;
    double until; /* the next instant at which any of this changes */
} Verdict;

/* One rule set of a name found at label offset `off` (Policy.decide's inner loop). */
static void
weigh(Blocks *b, Py_ssize_t row, int64_t need, Py_ssize_t off, double now, Verdict *v)
{
    if (row < 0 || row >= b->rows)
        return;
    const int64_t *flags = (const int64_t *)b->flags.buf + 2 * row;
    const double *t = (const double *)b->times.buf + 3 * row;
    if (!(flags[0] & need) || !flags[1] || now >= t[2])
        return;
    /* pending until t0, monitored until t1 (neither blocks now), enforced until t2 */
    double next = now < t[0] ? t[0] : now < t[1] ? t[1] : t[2];
    if (next < v->until)
        v->until = next;
    if (now < t[1])
        return;
    if (flags[0] & b->allow)
        v->allowed = 1;
    else if (v->block < 0) {
        v->block = row;
        v->where = off;
    }
}

/* Policy.decide for a name that no pattern can match (the view exists only then), for
   the group "all": which rule set blocks it, or none (-1). -2: an error. */
static int
decide(Blocks *b, const unsigned char *text, Py_ssize_t length, const Py_ssize_t *labels,
       Py_ssize_t count, double now, Verdict *v)
{
    v->block = -1;
    v->where = 0;
    v->allowed = 0;
    v->until = Py_HUGE_VAL;
    int64_t need = b->exact;
    Py_ssize_t depth = count;
    for (Py_ssize_t k = 0; k < count; k++, depth--) {
        Py_ssize_t off = labels[k];
        int64_t value = -1;
        if (b->depths[depth >> 3] >> (depth & 7) & 1)
            value = lookup(b, text + off, length - off);
        if (value >= 0) {
            if ((uint64_t)value & MULTI) {
                Py_ssize_t index = (Py_ssize_t)((uint64_t)value & ~(uint64_t)MULTI);
                if (index >= PyTuple_GET_SIZE(b->multi))
                    return -1;
                PyObject *rows = PyTuple_GET_ITEM(b->multi, index);
                for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(rows); j++) {
                    Py_ssize_t row = PyLong_AsSsize_t(PyTuple_GET_ITEM(rows, j));
                    if (row == -1 && PyErr_Occurred())
                        return -2;
                    weigh(b, row, need, off, now, v);
                }
            }
            else
                weigh(b, (Py_ssize_t)value, need, off, now, v);
        }
        need = b->subdomains;
    }
    return 0;
}

static unsigned char *
put16(unsigned char *p, unsigned int value)
{
    p[0] = (unsigned char)(value >> 8);
    p[1] = (unsigned char)value;
    return p + 2;
}

static unsigned char *
put32(unsigned char *p, uint32_t value)
{
    p[0] = (unsigned char)(value >> 24);
    p[1] = (unsigned char)(value >> 16);
    p[2] = (unsigned char)(value >> 8);
    p[3] = (unsigned char)value;
    return p + 4;
}

/* A record with a compressed owner, class IN (wire.rr). */
static unsigned char *
put_rr(unsigned char *p, unsigned int owner, unsigned int rtype, uint32_t ttl,
       const char *rdata, Py_ssize_t rdlen, const unsigned char *tail, Py_ssize_t tail_len)
{
    p = put16(p, 0xC000 | owner);
    p = put16(p, rtype);
    p = put16(p, 1);
    p = put32(p, ttl);
    p = put16(p, (unsigned int)(rdlen + tail_len));
    memcpy(p, rdata, (size_t)rdlen);
    p += rdlen;
    if (tail_len) {
        memcpy(p, tail, (size_t)tail_len);
        p += tail_len;
    }
    return p;
}

Py_ssize_t
blocks_answer(Blocks *b, const unsigned char *data, Py_ssize_t size, double now,
              unsigned char *out, Py_ssize_t room, Py_ssize_t *slot, double *until)
{
    if (!b->on || size < 17)
        return 0;
    unsigned int flags = (unsigned int)data[2] << 8 | data[3];
    /* A query (QR clear), opcode QUERY, one question, no answer or authority records,
       at most one additional (the OPT record). */
    if (flags & 0xF800 || data[4] || data[5] != 1 || data[6] || data[7] || data[8] || data[9]
        || data[10] || data[11] > 1)
        return 0;
    int edns = data[11];
    /* The question name: labels of 1 to 63 octets, no pointer, 255 octets at most; lower
       case and dotted as policy.model.dotted makes it (a dot inside a label is 0xFF). */
    unsigned char text[MAX_NAME];
    Py_ssize_t labels[MAX_LABELS], count = 0, off = 12;
    while (1) {
        if (off >= size)
            return 0;
        unsigned int length = data[off];
        if (length == 0)
            break;
        if (length > 63 || count >= MAX_LABELS || off - 12 + 1 + length >= MAX_NAME)
            return 0;
        labels[count++] = off - 12;
        if (off + 1 + (Py_ssize_t)length > size)
            return 0;
        if (off > 12)
            text[off - 13] = '.';
        for (unsigned int i = 0; i < length; i++)
            text[off - 12 + i] = folded[data[off + 1 + i]];
        off += 1 + length;
    }
    if (count == 0)
        return 0;
    Py_ssize_t text_len = off - 13; /* the name's octets, less its first length and root */
    Py_ssize_t question_end = off + 5;
    if (question_end > size)
        return 0;
    unsigned int qtype = (unsigned int)data[off + 1] << 8 | data[off + 2];
    unsigned int qclass = (unsigned int)data[off + 3] << 8 | data[off + 4];
    if (qclass != 1 || qtype == 0 || qtype == TYPE_OPT || (qtype >= 251 && qtype <= 255))
        return 0; /* ANY (RFC 8482's cut) and the other meta types: Python's */
    int dnssec_ok = 0;
    Py_ssize_t limit = 512;
    if (edns) {
        const unsigned char *opt = data + question_end;
        if (size != question_end + 11 || opt[0] || (opt[1] << 8 | opt[2]) != TYPE_OPT
            || opt[6] || opt[9] || opt[10])
            return 0; /* not a bare OPT, or EDNS version not 0 */
        unsigned int payload = (unsigned int)opt[3] << 8 | opt[4];
        limit = payload < 512 ? 512 : payload > EDNS_PAYLOAD ? EDNS_PAYLOAD : payload;
        dnssec_ok = opt[7] & 0x80;
    }
    else if (size != question_end)
        return 0;

    Verdict v;
    int decided = decide(b, text, text_len, labels, count, now, &v);
    if (decided < 0)
        return decided == -2 ? -1 : 0;
    if (v.allowed || v.block < 0)
        return 0;

    /* sinkhole.blocked_answer */
    PyObject *row = PyTuple_GET_ITEM(b->answers, v.block);
    if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) != 7)
        return 0;
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(row, 0));
    long list_ttl = PyLong_AsLong(PyTuple_GET_ITEM(row, 1));
    if (PyErr_Occurred())
        return -1;
    PyObject *soa = PyTuple_GET_ITEM(row, 2), *opt = PyTuple_GET_ITEM(row, dnssec_ok ? 6 : 5);
    double end = ((const double *)b->times.buf)[3 * v.block + 2], left = end - now;
    /* (Resolver._decide: the memo keeps it until the window's end is a TTL away) */
    *until = v.until < end - (double)list_ttl ? v.until : end - (double)list_ttl;
    uint32_t ttl = (uint32_t)list_ttl;
    if (left < (double)list_ttl)
        ttl = left > 0 ? (uint32_t)left : 0;
    unsigned int rcode = 0, an = 0, ns = 0;
    PyObject *addrs = NULL;
    Py_ssize_t addr_len = 0;
    if (kind == KIND_REFUSED)
        rcode = 5;
    else {
        if (kind == KIND_NULL || kind == KIND_SINKHOLE) {
            if (qtype == TYPE_A) {
                addrs = PyTuple_GET_ITEM(row, 3);
                addr_len = 4;
            }
            else if (qtype == TYPE_AAAA) {
                addrs = PyTuple_GET_ITEM(row, 4);
                addr_len = 16;
            }
        }
        if (addrs != NULL && kind == KIND_NULL)
            an = 1;
        else if (addrs != NULL && PyBytes_CheckExact(addrs))
            an = (unsigned int)(PyBytes_GET_SIZE(addrs) / addr_len);
        if (an == 0) {
            if (kind == KIND_NXDOMAIN)
                rcode = 3;
            ns = 1;
        }
    }
    if (!PyBytes_CheckExact(soa) || !PyBytes_CheckExact(opt))
        return 0;
    Py_ssize_t question = question_end - 12;
    Py_ssize_t records = an ? an * (12 + addr_len) : ns ? 12 + PyBytes_GET_SIZE(soa) + 4 : 0;
    Py_ssize_t length = 12 + question + records + (edns ? PyBytes_GET_SIZE(opt) : 0);
    if (length > limit || length > room)
        return 0; /* answers.fit's work: Python's */

    /* The Info slot of this kind of answer; one a call looks up once, as a rule (no Python
       runs during a call of the C loop, so the slots dict stays as it was). */
    long long kind_key = (long long)v.block << 20 | (long long)qtype << 4 | rcode;
    if (kind_key != b->last_kind) {
        PyObject *key = PyLong_FromLongLong(kind_key);
        if (key == NULL)
            return -1;
        PyObject *found = PyDict_GetItemWithError(b->slots, key); /* borrowed */
        Py_DECREF(key);
        if (found == NULL)
            return PyErr_Occurred() ? -1 : 0; /* a kind of answer Python has not made yet */
        Py_ssize_t index = PyLong_AsSsize_t(found);
        if (index == -1 && PyErr_Occurred())
            return -1;
        b->last_kind = kind_key;
        b->last_slot = index;
    }
    *slot = b->last_slot;

    unsigned char *p = out;
    p[0] = data[0];
    p[1] = data[1];
    /* QR and RA, the query's opcode, RD and CD, the rcode (wire.response_flags) */
    p = put16(p + 2, 0x8080 | (flags & 0x7910) | rcode);
    p = put16(p, 1);
    p = put16(p, an);
    p = put16(p, ns);
    p = put16(p, (unsigned int)edns);
    memcpy(p, data + 12, (size_t)question);
    p += question;
    if (an) {
        static const char zeros[16] = {0};
        const char *raw = kind == KIND_NULL ? zeros : PyBytes_AS_STRING(addrs);
        for (unsigned int i = 0; i < an; i++)
            p = put_rr(p, 12, qtype, ttl, raw + i * addr_len, addr_len, NULL, 0);
    }
    else if (ns) {
        unsigned char minimum[4];
        put32(minimum, ttl);
        p = put_rr(p, (unsigned int)(12 + v.where), TYPE_SOA, ttl,
                   PyBytes_AS_STRING(soa), PyBytes_GET_SIZE(soa), minimum, 4);
    }
    if (edns) {
        memcpy(p, PyBytes_AS_STRING(opt), (size_t)PyBytes_GET_SIZE(opt));
        p += PyBytes_GET_SIZE(opt);
    }
    return p - out;
}
