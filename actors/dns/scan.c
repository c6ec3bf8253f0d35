/* meshsup.actors.dns.scan: the reads of DNS messages every forwarded query
 * makes, in C (README, "How it is built": what is native and why).
 *
 * A forwarded query costs the DNS worker a read of the client's query, a key
 * for the fast path and a full check of the upstream's answer (every name,
 * pointer and record bound, as dnspython checks them) with where its TTLs
 * are. In Python those reads were about a third of a forward's CPU time;
 * here they are a small part of it. What to do with what is read (rules,
 * routing, the cache, replies) stays in Python (wire.py and its callers).
 *
 * Every byte read is of untrusted input: every read is checked against the
 * message's length first (`need`, `size`), and nothing is written but the new
 * objects made here. The functions mirror what wire.py's Python did, result
 * for result (tests/actors/dns/test_scan.py compares them with dnspython on
 * mutated messages).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <string.h>

#define HEADER_LEN 12
#define MAX_NAME 255
#define MAX_LABELS 128 /* 255 bytes hold at most 127 labels of one byte */
#define MAX_POINTER_HOPS 16 /* dnspython's limit on a chain of compression pointers */
#define RR_FIXED 10         /* type, class, ttl, rdlength */
#define QR 0x8000
#define TC 0x0200
#define AD 0x0020
#define OPCODE_MASK 0x7800
#define EDNS_DO 0x8000
#define T_A 1
#define T_SOA 6
#define T_AAAA 28
#define T_OPT 41
#define COOKIE 10
#define ANSWER 0
#define AUTHORITY 1
#define ADDITIONAL 2

static PyObject *WireError;

static inline unsigned u16(const uint8_t *p) { return ((unsigned)p[0] << 8) | p[1]; }
static inline uint32_t u32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* A name's labels, as (offset, length) in the message. */
typedef struct {
    int count;
    Py_ssize_t at[MAX_LABELS];
    uint8_t len[MAX_LABELS];
} Labels;

/* The offset just past the name at offset, after checking all of it as
 * dnspython does: every compression pointer strictly before the one before
 * it (so no loops) and never into the header, labels below 64 bytes, 255
 * bytes in all. -1 with *why set if it is not a name. labels may be NULL. */
static Py_ssize_t walk_name(const uint8_t *w, Py_ssize_t size, Py_ssize_t offset, Labels *labels, const char **why) {
    Py_ssize_t end = -1, limit = size, start = offset;
    int total = 1, hops = 0;
    if (labels != NULL)
        labels->count = 0;
    for (;;) {
        if (offset < 0 || offset >= limit) {
            *why = "name runs past its end";
            return -1;
        }
        unsigned length = w[offset];
        if (length == 0)
            break;
        if (length < 64) {
            total += (int)length + 1;
            if (offset + 1 + (Py_ssize_t)length > limit) {
                *why = "label runs past its end";
                return -1;
            }
            if (total > MAX_NAME) { /* no name goes on past this; the labels would not fit either */
                *why = "name too long";
                return -1;
            }
            if (labels != NULL) {
                labels->at[labels->count] = offset + 1;
                labels->len[labels->count] = (uint8_t)length;
                labels->count++;
            }
            offset += 1 + (Py_ssize_t)length;
        } else if (length >= 0xC0) {
            if (offset + 1 >= limit) {
                *why = "pointer runs past its end";
                return -1;
            }
            Py_ssize_t target = ((Py_ssize_t)(length & 0x3F) << 8) | w[offset + 1];
            if (end < 0)
                end = offset + 2;
            hops++;
            if (!(HEADER_LEN <= target && target < start) || hops > MAX_POINTER_HOPS) {
                *why = "bad compression pointer";
                return -1;
            }
            limit = start;
            offset = target;
            start = target;
        } else {
            *why = "bad label type";
            return -1;
        }
    }
    return end >= 0 ? end : offset + 1;
}

static int buffer_of(PyObject *obj, Py_buffer *view) {
    return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE);
}

PyDoc_STRVAR(read_name_doc,
             "read_name(wire, offset, labels=None) -> int\n\n"
             "The offset just past the name at offset, every pointer and bound checked (WireError if\n"
             "it is not a name); its labels appended to labels, if given.");

/* The name at args[1] in args[0], walked: its end, with view held until the caller
 * releases it; -1 with an exception set (and nothing held) if it is not a name. */
static Py_ssize_t name_at(PyObject *const *args, Py_buffer *view, Labels *labels) {
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if ((offset == -1 && PyErr_Occurred()) || buffer_of(args[0], view) < 0)
        return -1;
    const char *why = NULL;
    Py_ssize_t end = walk_name(view->buf, view->len, offset, labels, &why);
    if (end < 0) {
        PyErr_SetString(WireError, why);
        PyBuffer_Release(view);
    }
    return end;
}

static PyObject *read_name(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "read_name(wire, offset, labels=None)");
        return NULL;
    }
    PyObject *list = nargs == 3 && args[2] != Py_None ? args[2] : NULL;
    if (list != NULL && !PyList_Check(list)) {
        PyErr_SetString(PyExc_TypeError, "labels must be a list");
        return NULL;
    }
    Py_buffer view;
    Labels labels;
    Py_ssize_t end = name_at(args, &view, list != NULL ? &labels : NULL);
    if (end < 0)
        return NULL;
    PyObject *result = NULL;
    for (int i = 0; list != NULL && i < labels.count; i++) {
        PyObject *label = PyBytes_FromStringAndSize((const char *)view.buf + labels.at[i], labels.len[i]);
        if (label == NULL || PyList_Append(list, label) < 0) {
            Py_XDECREF(label);
            goto done;
        }
        Py_DECREF(label);
    }
    result = PyLong_FromSsize_t(end);
done:
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(plain_query_doc,
             "plain_query(wire) -> (flags, qname, qtype, qclass, edns, payload, do) | None\n\n"
             "A query (QR clear, opcode QUERY) with one question and nothing else but a bare OPT\n"
             "(no options, version 0); None for anything else, even if valid.");

static PyObject *plain_query(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (buffer_of(arg, &view) < 0)
        return NULL;
    const uint8_t *w = view.buf;
    Py_ssize_t size = view.len, offset = HEADER_LEN;
    PyObject *result = NULL;
    if (size < HEADER_LEN)
        goto none;
    unsigned flags = u16(w + 2), qdcount = u16(w + 4), ancount = u16(w + 6), nscount = u16(w + 8);
    unsigned arcount = u16(w + 10);
    if (flags & (QR | OPCODE_MASK) || qdcount != 1 || ancount || nscount || arcount > 1)
        goto none;
    while (offset < size && w[offset] > 0 && w[offset] < 64)
        offset += 1 + w[offset];
    if (offset >= size || w[offset] != 0 || offset + 1 - HEADER_LEN > MAX_NAME)
        goto none;
    Py_ssize_t name_end = offset + 1, end = name_end + 4;
    if (end > size)
        goto none;
    unsigned qtype = u16(w + name_end), qclass = u16(w + name_end + 2);
    long edns = -1;
    unsigned payload = 0;
    int do_bit = 0;
    if (arcount) {
        if (size != end + 1 + RR_FIXED || w[end] != 0)
            goto none;
        const uint8_t *opt = w + end + 1;
        uint32_t ttl = u32(opt + 4);
        /* The top 16 bits are the extended RCODE and the version: both 0 here. */
        if (u16(opt) != T_OPT || u16(opt + 8) || ttl & 0xFFFF0000u)
            goto none;
        edns = 0;
        payload = u16(opt + 2);
        do_bit = (ttl & EDNS_DO) != 0;
    } else if (end != size) {
        goto none;
    }
    result = Py_BuildValue("(Iy#IIlIO)", flags, (const char *)w + HEADER_LEN, name_end - HEADER_LEN, qtype, qclass,
                           edns, payload, do_bit ? Py_True : Py_False);
    PyBuffer_Release(&view);
    return result;
none:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(query_key_doc,
             "query_key(query) -> bytes\n\n"
             "The query's bytes after the ID, the data of an EDNS COOKIE option zeroed (its length\n"
             "kept); a query not laid out as one question and one OPT as it is.");

static const uint8_t ONE_QUESTION_ONE_ADDITIONAL[8] = {0, 1, 0, 0, 0, 0, 0, 1};

static PyObject *query_key(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (buffer_of(arg, &view) < 0)
        return NULL;
    const uint8_t *q = view.buf;
    Py_ssize_t size = view.len, offset = HEADER_LEN, start;
    PyObject *key = NULL;
    if (size < 2) {
        key = PyBytes_FromStringAndSize(NULL, 0);
        goto done;
    }
    if (size < HEADER_LEN + 16 || memcmp(q + 4, ONE_QUESTION_ONE_ADDITIONAL, 8) != 0)
        goto as_is;
    while (offset < size && q[offset] > 0 && q[offset] < 64)
        offset += 1 + q[offset];
    start = offset + 1 + 4; /* the OPT: root name, then its fixed part */
    if (start + 1 + RR_FIXED > size || q[offset] || q[start])
        goto as_is;
    unsigned rtype = u16(q + start + 1), rdlength = u16(q + start + 9);
    offset = start + 1 + RR_FIXED;
    if (rtype != T_OPT || !rdlength || offset + (Py_ssize_t)rdlength != size)
        goto as_is;
    key = PyBytes_FromStringAndSize((const char *)q + 2, size - 2);
    if (key == NULL)
        goto done;
    uint8_t *k = (uint8_t *)PyBytes_AS_STRING(key) - 2; /* indexed as the query */
    while (offset + 4 <= size) {
        unsigned code = u16(q + offset), length = u16(q + offset + 2);
        offset += 4;
        if (code == COOKIE) {
            Py_ssize_t stop = offset + (Py_ssize_t)length < size ? offset + (Py_ssize_t)length : size;
            memset(k + offset, 0, (size_t)(stop - offset));
        }
        offset += length;
    }
    goto done;
as_is:
    key = PyBytes_FromStringAndSize((const char *)q + 2, size - 2);
done:
    PyBuffer_Release(&view);
    return key;
}

/* A name as dnspython writes it, lowercase, no final dot ("" for the root). */
static PyObject *name_text(const uint8_t *w, const Labels *labels) {
    char text[MAX_NAME * 4 + 1]; /* a byte takes at most 4 characters (\DDD) */
    Py_ssize_t n = 0;
    for (int i = 0; i < labels->count; i++) {
        if (i)
            text[n++] = '.';
        for (int j = 0; j < labels->len[i]; j++) {
            uint8_t c = w[labels->at[i] + j];
            if (strchr("\"().;\\@$", c) != NULL && c) {
                text[n++] = '\\';
                text[n++] = (char)c;
            } else if (c > 0x20 && c < 0x7F) {
                text[n++] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
            } else {
                text[n++] = '\\';
                text[n++] = (char)('0' + c / 100);
                text[n++] = (char)('0' + c / 10 % 10);
                text[n++] = (char)('0' + c % 10);
            }
        }
    }
    return PyUnicode_DecodeASCII(text, n, NULL);
}

PyDoc_STRVAR(name_text_doc,
             "name_text(wire, offset) -> str\n\n"
             "The name at offset as dnspython writes it, lowercase, without the final dot (\"\" for the\n"
             "root); WireError as read_name.");

static PyObject *name_text_at(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "name_text(wire, offset)");
        return NULL;
    }
    Py_buffer view;
    Labels labels;
    if (name_at(args, &view, &labels) < 0)
        return NULL;
    PyObject *text = name_text(view.buf, &labels);
    PyBuffer_Release(&view);
    return text;
}

static int append_new(PyObject *list, PyObject *item) {
    if (item == NULL)
        return -1;
    int failed = PyList_Append(list, item);
    Py_DECREF(item);
    return failed;
}

static int lower_equal(const uint8_t *a, const uint8_t *b, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t x = a[i], y = b[i];
        if (x >= 'A' && x <= 'Z')
            x += 32;
        if (y >= 'A' && y <= 'Z')
            y += 32;
        if (x != y)
            return 0;
    }
    return 1;
}

/* The addresses learned from the answer section: A and AAAA records by owner, in order. */
typedef struct {
    PyObject *owners; /* owner name as written -> as text */
    PyObject *found;  /* (text, type) -> [address, ...], in order */
} Learning;

static int learn(Learning *l, const uint8_t *w, Py_ssize_t size, Py_ssize_t start, Py_ssize_t fixed, unsigned rtype,
                 Py_ssize_t rdata, unsigned rdlength) {
    PyObject *written = PyBytes_FromStringAndSize((const char *)w + start, fixed - start);
    if (written == NULL)
        return -1;
    PyObject *name = PyDict_GetItemWithError(l->owners, written); /* borrowed */
    if (name == NULL) {
        Labels labels;
        const char *why = NULL;
        if (!PyErr_Occurred() && walk_name(w, size, start, &labels, &why) < 0)
            PyErr_SetString(WireError, why); /* not so: the owner was read before */
        if (PyErr_Occurred() || (name = name_text(w, &labels)) == NULL || PyDict_SetItem(l->owners, written, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(written);
            return -1;
        }
        Py_DECREF(name); /* the dict holds it */
    }
    Py_DECREF(written);
    char text[INET6_ADDRSTRLEN];
    if (inet_ntop(rtype == T_A ? AF_INET : AF_INET6, w + rdata, text, sizeof text) == NULL) {
        PyErr_SetString(PyExc_OSError, "inet_ntop");
        return -1;
    }
    (void)rdlength;
    PyObject *key = Py_BuildValue("(OI)", name, rtype);
    if (key == NULL)
        return -1;
    PyObject *list = PyDict_GetItemWithError(l->found, key);
    int failed = -1;
    if (list == NULL) {
        if (PyErr_Occurred() || (list = PyList_New(0)) == NULL)
            goto out;
        if (PyDict_SetItem(l->found, key, list) < 0) {
            Py_DECREF(list);
            goto out;
        }
        Py_DECREF(list);
    }
    failed = append_new(list, PyUnicode_FromString(text));
out:
    Py_DECREF(key);
    return failed;
}

/* ((name, (address, ...)), ...) from what learn() found. */
static PyObject *addresses_of(Learning *l) {
    PyObject *out = PyTuple_New(PyDict_GET_SIZE(l->found));
    if (out == NULL)
        return NULL;
    Py_ssize_t pos = 0, i = 0;
    PyObject *key, *list;
    while (PyDict_Next(l->found, &pos, &key, &list)) {
        PyObject *item = Py_BuildValue("(ON)", PyTuple_GET_ITEM(key, 0), PyList_AsTuple(list));
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i++, item);
    }
    return out;
}

/* A tuple of Python ints from n unsigned longs. */
static PyObject *ints(const unsigned long *values, Py_ssize_t n) {
    PyObject *out = PyTuple_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLong(values[i]);
        if (v == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyTuple_SET_ITEM(out, i, v);
    }
    return out;
}

#define MALFORMED ((PyObject *)1) /* a result of records(): the answer is not well formed */

/* The records of an answer after its (checked) question at base: the fields of
 * wire.WireAnswer, MALFORMED, or NULL with an exception set. */
static PyObject *records(const uint8_t *w, Py_ssize_t size, Py_ssize_t base, unsigned flags, const unsigned counts[3],
                         int learning) {
    PyObject *result = NULL;
    /* A record takes at least 11 bytes (a root owner and the fixed part): no more are read. */
    unsigned long cap = (unsigned long)(size - base) / 11 + 1;
    unsigned long *ttls = PyMem_Calloc(5 * cap + 2, sizeof(unsigned long));
    if (ttls == NULL)
        return PyErr_NoMemory();
    unsigned long *types = ttls + cap, *ttl_offsets = types + cap, *set_ends = ttl_offsets + cap;
    Learning l = {NULL, NULL};
    if (learning && ((l.owners = PyDict_New()) == NULL || (l.found = PyDict_New()) == NULL))
        goto fail;
    Py_ssize_t offset = base, opt_start = -1, opt_end = -1;
    long negative_ttl = -1;
    /* The RRset of the record before: owner (as written, compared lowercase), type, class, section. */
    Py_ssize_t set_owner = -1, set_owner_len = 0;
    long set_type = -1, set_class = -1;
    int set_section = -1;
    unsigned long index = 0, sets = 0;
    for (int section = 0; section < 3; section++) {
        for (unsigned n = 0; n < counts[section]; n++) {
            Py_ssize_t start = offset, fixed;
            const char *why = NULL;
            if (offset >= size)
                goto malformed;
            unsigned first = w[offset];
            if (first == 0) { /* the root, as an OPT's owner */
                fixed = offset + 1;
            } else if (first == 0xC0 && offset + 1 < size && w[offset + 1] == HEADER_LEN) { /* the question's name */
                fixed = offset + 2;
            } else if ((fixed = walk_name(w, size, offset, NULL, &why)) < 0) {
                goto malformed;
            }
            if (fixed + RR_FIXED > size)
                goto malformed;
            unsigned rtype = u16(w + fixed), rclass = u16(w + fixed + 2), rdlength = u16(w + fixed + 8);
            uint32_t ttl = u32(w + fixed + 4);
            Py_ssize_t rdata = fixed + RR_FIXED;
            offset = rdata + rdlength;
            if (offset > size)
                goto malformed;
            if (rtype == T_OPT) {
                if (section != ADDITIONAL || opt_start >= 0 || first != 0)
                    goto malformed;
                opt_start = start;
                opt_end = offset;
                if (ttl >> 24) { /* we send no cookies and EDNS 0: nothing to act on */
                    result = PyUnicode_FromString("extended_rcode");
                    goto done;
                }
                continue;
            }
            Py_ssize_t owner_len = fixed - start;
            if ((long)rtype != set_type || section != set_section || (long)rclass != set_class ||
                owner_len != set_owner_len || !lower_equal(w + start, w + set_owner, owner_len)) {
                if (index) {
                    set_ends[2 * sets] = (unsigned long)(start - base);
                    set_ends[2 * sets + 1] = index;
                    sets++;
                }
                set_owner = start, set_owner_len = owner_len, set_type = rtype, set_class = rclass;
                set_section = section;
            }
            if (ttl & 0x80000000u) /* RFC 2181 section 8: a TTL with the top bit set is read as 0 */
                ttl = 0;
            ttls[index] = ttl;
            types[index] = rtype;
            ttl_offsets[index] = (unsigned long)(fixed + 4 - base);
            index++;
            if (rtype == T_A || rtype == T_AAAA) {
                if (rdlength != (rtype == T_A ? 4u : 16u))
                    goto malformed;
                if (section == ANSWER && learning && learn(&l, w, size, start, fixed, rtype, rdata, rdlength) < 0)
                    goto fail;
            } else if (rtype == T_SOA) {
                /* The two names may run past the record's data: the bound below catches it. */
                Py_ssize_t mname_end = walk_name(w, size, rdata, NULL, &why);
                Py_ssize_t minimum_at = mname_end < 0 ? -1 : walk_name(w, size, mname_end, NULL, &why);
                if (minimum_at < 0 || minimum_at + 20 != offset)
                    goto malformed;
                if (section == AUTHORITY && negative_ttl < 0) {
                    uint32_t minimum = u32(w + minimum_at + 16);
                    negative_ttl = ttl < minimum ? ttl : minimum;
                }
            }
        }
    }
    if (offset != size)
        goto malformed;
    Py_ssize_t records_end = size;
    if (opt_start >= 0) {
        /* Records after the OPT would move; their pointers might not. Rare enough to refuse. */
        if (opt_end != offset)
            goto malformed;
        records_end = opt_start;
    }
    set_ends[2 * sets] = (unsigned long)(records_end - base);
    set_ends[2 * sets + 1] = index;
    sets++;
    PyObject *set_tuple = PyTuple_New((Py_ssize_t)sets);
    for (unsigned long i = 0; set_tuple != NULL && i < sets; i++) {
        PyObject *pair = ints(set_ends + 2 * i, 2);
        if (pair == NULL) {
            Py_CLEAR(set_tuple);
            break;
        }
        PyTuple_SET_ITEM(set_tuple, (Py_ssize_t)i, pair);
    }
    PyObject *addresses = learning && PyDict_GET_SIZE(l.found) ? addresses_of(&l) : PyTuple_New(0);
    PyObject *negative = negative_ttl < 0 ? Py_NewRef(Py_None) : PyLong_FromLong(negative_ttl);
    PyObject *ttl_tuple = ints(ttls, (Py_ssize_t)index), *type_tuple = ints(types, (Py_ssize_t)index);
    PyObject *offset_tuple = ints(ttl_offsets, (Py_ssize_t)index);
    if (set_tuple != NULL && addresses != NULL && negative != NULL && ttl_tuple != NULL && type_tuple != NULL &&
        offset_tuple != NULL) {
        result = Py_BuildValue("(iOny#(IIk)OOOOOO)", (int)(flags & 0xF), flags & AD ? Py_True : Py_False, base,
                               (const char *)w + base, records_end - base, counts[0], counts[1],
                               (unsigned long)counts[2] - (opt_start >= 0), ttl_tuple, type_tuple, offset_tuple,
                               set_tuple, negative, addresses);
    }
    Py_XDECREF(set_tuple);
    Py_XDECREF(addresses);
    Py_XDECREF(negative);
    Py_XDECREF(ttl_tuple);
    Py_XDECREF(type_tuple);
    Py_XDECREF(offset_tuple);
    goto done;
malformed:
    result = MALFORMED;
    goto done;
fail:
    result = NULL;
done:
    Py_XDECREF(l.owners);
    Py_XDECREF(l.found);
    PyMem_Free(ttls);
    return result;
}

PyDoc_STRVAR(answer_doc,
             "answer(wire, qname, qtype, qclass, learn) -> tuple | str\n\n"
             "An upstream's answer to the question: the fields of wire.WireAnswer, in order, or why\n"
             "it cannot be used (malformed, not_response, question_mismatch, truncated,\n"
             "extended_rcode). qname: the question's name in wire form; case does not matter.\n"
             "Without learn, the answer's addresses are checked but not read out.");

static PyObject *answer(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "answer(wire, qname, qtype, qclass, learn)");
        return NULL;
    }
    long qtype = PyLong_AsLong(args[2]), qclass = PyLong_AsLong(args[3]);
    int learning = PyObject_IsTrue(args[4]);
    if (PyErr_Occurred() || learning < 0)
        return NULL;
    Py_buffer view, name;
    if (buffer_of(args[0], &view) < 0)
        return NULL;
    if (buffer_of(args[1], &name) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const uint8_t *w = view.buf;
    Py_ssize_t size = view.len, name_end = HEADER_LEN + name.len, base = name_end + 4;
    const char *reason = NULL;
    PyObject *result = NULL;
    if (size < HEADER_LEN) {
        reason = "malformed";
        goto done;
    }
    unsigned flags = u16(w + 2);
    if (!(flags & QR) || flags & OPCODE_MASK) {
        reason = "not_response";
        goto done;
    }
    if (u16(w + 4) != 1) {
        reason = "question_mismatch";
        goto done;
    }
    if (size < base) {
        reason = "malformed";
        goto done;
    }
    /* The same bytes, as upstreams echo the question, or the same name in another case. */
    if (!lower_equal(w + HEADER_LEN, name.buf, name.len) || (long)u16(w + name_end) != qtype ||
        (long)u16(w + name_end + 2) != qclass) {
        reason = "question_mismatch";
        goto done;
    }
    if (flags & TC) {
        reason = "truncated";
        goto done;
    }
    unsigned counts[3] = {u16(w + 6), u16(w + 8), u16(w + 10)};
    result = records(w, size, base, flags, counts, learning);
    if (result == MALFORMED) {
        result = NULL;
        reason = "malformed";
    }
done:
    if (reason != NULL)
        result = PyUnicode_FromString(reason);
    PyBuffer_Release(&name);
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(assemble_doc,
             "assemble(query_id, query_flags, question, answer, edns, do) -> bytes\n\n"
             "The reply to a query (its ID as written, flags and question in wire form) from\n"
             "answer (a wire.WireAnswer), as message.render would make it: RD and CD from the\n"
             "query, RA, AD only for clients asking for DNSSEC data (RFC 6840 section 5.8), our\n"
             "own OPT if edns. WireError if the question is not as long as answer's.");

static PyObject *s_base, *s_records, *s_counts, *s_rcode, *s_authenticated;

/* An attribute of answer that must be an int in [0, limit]; -1 with an exception set if not. */
static long small_int(PyObject *answer, PyObject *name, long limit) {
    PyObject *value = PyObject_GetAttr(answer, name);
    if (value == NULL)
        return -1;
    long n = PyLong_AsLong(value);
    Py_DECREF(value);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (n < 0 || n > limit) {
        PyErr_Format(PyExc_ValueError, "%U out of range", name);
        return -1;
    }
    return n;
}

static PyObject *assemble(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "assemble(query_id, query_flags, question, answer, edns, do)");
        return NULL;
    }
    PyObject *answer = args[3];
    long query_flags = PyLong_AsLong(args[1]);
    int edns = PyObject_IsTrue(args[4]), do_bit = PyObject_IsTrue(args[5]);
    if ((query_flags == -1 && PyErr_Occurred()) || edns < 0 || do_bit < 0)
        return NULL;
    long base = small_int(answer, s_base, 0xFFFF), rcode = small_int(answer, s_rcode, 0xF);
    if (base < 0 || rcode < 0)
        return NULL;
    int authenticated = -1;
    PyObject *value = PyObject_GetAttr(answer, s_authenticated);
    if (value != NULL) {
        authenticated = PyObject_IsTrue(value);
        Py_DECREF(value);
    }
    unsigned long counts[3];
    PyObject *counts_obj = PyObject_GetAttr(answer, s_counts);
    if (authenticated < 0 || counts_obj == NULL)
        goto fail_counts;
    if (!PyTuple_Check(counts_obj) || PyTuple_GET_SIZE(counts_obj) != 3) {
        PyErr_SetString(PyExc_ValueError, "counts must be three numbers");
        goto fail_counts;
    }
    for (int i = 0; i < 3; i++) {
        counts[i] = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(counts_obj, i));
        if (PyErr_Occurred())
            goto fail_counts;
        if (counts[i] + (i == 2 && edns) > 0xFFFF) {
            PyErr_SetString(PyExc_ValueError, "count out of range");
            goto fail_counts;
        }
    }
    Py_DECREF(counts_obj);
    PyObject *records = PyObject_GetAttr(answer, s_records);
    if (records == NULL)
        return NULL;
    Py_buffer id, question, body;
    PyObject *reply = NULL;
    if (buffer_of(args[0], &id) < 0)
        goto fail_records;
    if (buffer_of(args[2], &question) < 0)
        goto fail_id;
    if (buffer_of(records, &body) < 0)
        goto fail_question;
    if (HEADER_LEN + question.len != base) {
        PyErr_SetString(WireError, "question of another length");
        goto done;
    }
    unsigned flags = QR | 0x0080 /* RA */ | ((unsigned)query_flags & (0x0100 /* RD */ | 0x0010 /* CD */)) | (unsigned)rcode;
    if (authenticated && (do_bit || query_flags & AD))
        flags |= AD;
    Py_ssize_t size = id.len + 10 + question.len + body.len + (edns ? 1 + RR_FIXED : 0);
    reply = PyBytes_FromStringAndSize(NULL, size);
    if (reply == NULL)
        goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(reply);
    unsigned long words[5] = {flags, 1, counts[0], counts[1], counts[2] + (edns ? 1 : 0)};
    memcpy(out, id.buf, (size_t)id.len);
    out += id.len;
    for (int i = 0; i < 5; i++, out += 2) {
        out[0] = (uint8_t)(words[i] >> 8);
        out[1] = (uint8_t)words[i];
    }
    memcpy(out, question.buf, (size_t)question.len);
    out += question.len;
    memcpy(out, body.buf, (size_t)body.len);
    out += body.len;
    if (edns) { /* ours: the root, OPT, our payload size, DO as the client's, no options */
        const uint8_t opt[1 + RR_FIXED] = {0, 0, T_OPT, 1232 >> 8, 1232 & 0xFF, 0, 0, do_bit ? 0x80 : 0, 0, 0, 0};
        memcpy(out, opt, sizeof opt);
    }
done:
    PyBuffer_Release(&body);
fail_question:
    PyBuffer_Release(&question);
fail_id:
    PyBuffer_Release(&id);
fail_records:
    Py_DECREF(records);
    return reply;
fail_counts:
    Py_XDECREF(counts_obj);
    return NULL;
}

static PyMethodDef methods[] = {
    {"read_name", (PyCFunction)(void (*)(void))read_name, METH_FASTCALL, read_name_doc},
    {"plain_query", plain_query, METH_O, plain_query_doc},
    {"query_key", query_key, METH_O, query_key_doc},
    {"name_text", (PyCFunction)(void (*)(void))name_text_at, METH_FASTCALL, name_text_doc},
    {"answer", (PyCFunction)(void (*)(void))answer, METH_FASTCALL, answer_doc},
    {"assemble", (PyCFunction)(void (*)(void))assemble, METH_FASTCALL, assemble_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "meshsup.actors.dns.scan", "DNS messages read in C: see scan.c.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_scan(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if ((s_base = PyUnicode_InternFromString("base")) == NULL ||
        (s_records = PyUnicode_InternFromString("records")) == NULL ||
        (s_counts = PyUnicode_InternFromString("counts")) == NULL ||
        (s_rcode = PyUnicode_InternFromString("rcode")) == NULL ||
        (s_authenticated = PyUnicode_InternFromString("authenticated")) == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    WireError = PyErr_NewExceptionWithDoc("meshsup.actors.dns.scan.WireError", "Not a well-formed message.",
                                          PyExc_ValueError, NULL);
    if (WireError == NULL || PyModule_AddObjectRef(m, "WireError", WireError) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
