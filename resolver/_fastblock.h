/* Blocked names answered in C (resolver/_fastblock.c), for the UDP loop of _fastudp.c.
   The Python side that builds what these read: resolver/core/blockview.py. */

#ifndef RESOLVER_FASTBLOCK_H
#define RESOLVER_FASTBLOCK_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    int on;                              /* 0: no view (None), nothing is answered here */
    Py_buffer keys, values, times, flags; /* 'Q', 'I', 'd' x3 a row, 'q' x2 a row */
    const unsigned char *depths;         /* 32 bytes: bit n set when some name has n labels */
    PyObject *multi, *answers, *slots;   /* tuple of tuples, tuple of tuples, dict */
    PyObject *sizes;                     /* the memo's bytes, UDP's and TCP's (a list) */
    int64_t exact, subdomains, allow;    /* the flag bits (policy/formats) */
    Py_ssize_t overhead;                 /* a memo entry's bytes beyond its answer's */
    Py_ssize_t share;                    /* evictions take 1/share of the memo at once */
    Py_ssize_t rows, size;               /* rule sets; table slots (a power of two) */
    long long last_kind;                 /* the kind of answer last looked up in slots */
    Py_ssize_t last_slot;                /* (-1: none yet), and its slot */
} Blocks;

/* Once, when the module is loaded: the table of lower case. */
void blocks_init(void);

/* Read the view (a blockview.View tuple, or None); 0, or -1 with an exception set. */
int blocks_open(Blocks *b, PyObject *view);
void blocks_close(Blocks *b);

/* The answer to the query `data` (its whole datagram) when a rule set blocks it and
   everything about it is plain: written to `out` (at most `room` bytes), its length
   returned, the Info slot that counts it in *slot and until when it stays right in
   *until (Context.until). 0: Python's to answer (not blocked, not plain, an answer not
   yet seen, too large); -1: an error. */
Py_ssize_t blocks_answer(Blocks *b, const unsigned char *data, Py_ssize_t size, double now,
                         unsigned char *out, Py_ssize_t room, Py_ssize_t *slot, double *until);

#endif
