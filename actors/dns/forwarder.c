/* meshsup.actors.dns.forwarder: the plain UDP forward, query to reply, in C.
 *
 * Most queries a worker forwards are alike: one question, a name that no
 * rule, route or local zone claims, to the one UDP upstream the group's
 * policy puts first, answered at once. In Python such a forward cost about
 * twenty microseconds of interpreter time across forty calls; here it costs
 * a few. The Forwarder takes those queries (take), sends them in bursts on
 * connected sockets of random source ports (send), reads the answers
 * (readable) and makes the clients' replies, and hands everything else back:
 * a query it does not take goes the resolver's way from the start, and a
 * forward that fails (a timeout, a SERVFAIL or REFUSED, an answer that does
 * not answer, a truncated one) is returned with why, for the resolver to
 * count and fail over as it does its own (resolver.Resolver.resume).
 *
 * What it decides it is told (configure: the upstream, the names it must
 * leave to the resolver, the in-flight cap and share, with the resolver's
 * own flights counted against both), and what it reads or writes is done
 * by the functions the rest of the worker uses (scan.plain_query,
 * wire.parse_answer, the cache's put, scan.assemble, wire.cut), called from
 * here: one reading of a message, one way to make a reply.
 *
 * As transport.py's UDP client, queries go out on fresh connected sockets,
 * so each one's port is the kernel's random pick (RFC 5452) and other
 * sources are filtered; each query has a random ID; a socket closes once
 * its queries are answered or timed out. A socket takes at most BURST
 * queries, for at most SOCKET_LIFE, across as many batches as come in that
 * time: under load a worker's batches are small (two workers on two cores
 * wake for a query or two), and a socket each would cost four system calls
 * more a query (socket, connect, epoll_ctl, close). A forged answer must
 * still match the port, the ID and the question of one of the few queries
 * the socket carries while it lives, as it must for transport.py's bursts. Identical questions in flight merge into one
 * forward (cache key: cache.cache_key's bytes).
 *
 * Every byte read from the network is checked against its length first;
 * the GIL is held throughout and every socket is non-blocking.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#define BURST 16           /* queries one socket (one source port) carries, as transport.UDP_BURST */
#define SOCKET_LIFE 0.05   /* seconds a socket takes queries for, at most (it lives on for their answers) */
#define BATCH 64           /* datagrams read per system call; sockets looked at per readable() */
#define ANSWER_SIZE 4096   /* we ask for at most 1232 bytes: a larger answer is dropped, counted */
#define HEADER_LEN 12
#define QR 0x80            /* in the third byte */
#define TC 0x02            /* in the third byte */
#define RD 0x0100
#define CD 0x0010
#define OPT_SIZE 11
#define OUR_PAYLOAD 1232
#define CLASSIC_UDP_LIMIT 512
#define T_ANY 255
#define C_IN 1
#define RCODE_SERVFAIL 2
#define RCODE_REFUSED 5

typedef struct {
    PyObject *key;      /* the cache key; NULL: the slot is free */
    PyObject *waiters;  /* list of (query, source, ctx, owner, fields) */
    PyObject *owner;    /* who started it (None: held to no share) */
    PyObject *upstream; /* the Upstream it went to */
    PyObject *qname;    /* the question's name as the first client wrote it */
    PyObject *wire;     /* the query sent, our ID in it */
    unsigned qtype, qclass;
    double sent, deadline;
    int next_free; /* the free list, while free */
} Flight;

typedef struct {
    int fd;         /* -1: the slot is free */
    uint32_t gen;   /* told apart from an earlier socket of the same slot, in epoll's data */
    int taken;      /* queries taken: ids[0..taken) */
    int sent;       /* of those, sent */
    int waiting;    /* flights still waiting on an answer */
    int retired;    /* takes no more; closes once nothing waits */
    double opened;  /* when it took its first query */
    uint16_t ids[BURST];
    int flights[BURST]; /* -1: answered, expired or failed */
} Sock;

typedef struct {
    PyObject_HEAD
    /* What it calls (the worker's own readers and writers) */
    PyObject *plain_query, *parse_answer, *assemble, *cut;
    /* As configured */
    PyObject *upstream; /* NULL: takes nothing */
    struct sockaddr_storage address;
    socklen_t address_len;
    double timeout;
    Py_ssize_t cap, share;
    PyObject *decline;       /* tuple of lowercase wire-form suffixes the resolver answers or routes */
    int single_label;        /* leave one-label names to the resolver (Docker's ndots) */
    PyObject *learn;         /* bool: whether answers' addresses are read out */
    PyObject *view;          /* bytes: the cache view (the default group's: b"") */
    PyObject *put;           /* the cache's put */
    PyObject *cached;        /* the cache's entries by key: a question there is the resolver's */
    PyObject *their_flights; /* the resolver's in-flight dict: counted against the cap */
    PyObject *their_owned;   /* and its count by owner: against the share */
    /* State */
    PyObject *flights; /* cache key -> flight index */
    PyObject *owned;   /* owner -> flights it started here */
    Flight *flight;
    int flight_slots, free_flight;
    Sock *sock;
    int sock_slots;
    int current; /* the socket taking queries now, -1: none */
    int epoll;
    uint16_t random_ids[2048];
    int random_left;
    /* Counters */
    unsigned long long taken, forwarded, merged, answers, sockets, mismatched, oversized, send_errors;
    unsigned long long render_errors, internal_errors, socket_errors;
    unsigned long long rcodes[16];
} Forwarder;

/* -- flights and sockets ---------------------------------------------------- */

static int new_flight(Forwarder *f) {
    if (f->free_flight < 0) {
        int grown = f->flight_slots ? 2 * f->flight_slots : 64;
        Flight *more = PyMem_Realloc(f->flight, sizeof(Flight) * (size_t)grown);
        if (more == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        f->flight = more;
        for (int i = grown - 1; i >= f->flight_slots; i--) {
            memset(&more[i], 0, sizeof(Flight));
            more[i].next_free = f->free_flight;
            f->free_flight = i;
        }
        f->flight_slots = grown;
    }
    int index = f->free_flight;
    f->free_flight = f->flight[index].next_free;
    return index;
}

/* Forget the flight (its entry in flights, its owner's count); its waiters are the caller's. */
static void end_flight(Forwarder *f, int index) {
    Flight *fl = &f->flight[index];
    if (PyDict_DelItem(f->flights, fl->key) < 0)
        PyErr_Clear();
    if (fl->owner != Py_None) {
        PyObject *count = PyDict_GetItem(f->owned, fl->owner);
        long left = count ? PyLong_AsLong(count) - 1 : 0;
        PyObject *value = left > 0 ? PyLong_FromLong(left) : NULL;
        if (value != NULL) {
            PyDict_SetItem(f->owned, fl->owner, value);
            Py_DECREF(value);
        } else if (PyDict_DelItem(f->owned, fl->owner) < 0) {
            PyErr_Clear();
        }
    }
    Py_CLEAR(fl->key);
    Py_CLEAR(fl->waiters);
    Py_CLEAR(fl->owner);
    Py_CLEAR(fl->upstream);
    Py_CLEAR(fl->qname);
    Py_CLEAR(fl->wire);
    fl->next_free = f->free_flight;
    f->free_flight = index;
}

static void close_sock(Forwarder *f, int index) {
    Sock *s = &f->sock[index];
    close(s->fd); /* which drops it from the epoll set too */
    s->fd = -1;
    if (f->current == index)
        f->current = -1;
}

static void close_if_done(Forwarder *f, int index) {
    Sock *s = &f->sock[index];
    if (s->fd >= 0 && s->retired && s->waiting == 0)
        close_sock(f, index);
}

/* Whether a socket has carried its BURST queries or taken them for SOCKET_LIFE: it takes no more. */
static int worn(const Sock *s, double now) { return s->taken >= BURST || now - s->opened >= SOCKET_LIFE; }

/* The socket taking queries takes no more (sent with the others, closed once answered). */
static void retire_current(Forwarder *f) {
    if (f->current >= 0) {
        f->sock[f->current].retired = 1;
        close_if_done(f, f->current);
        f->current = -1;
    }
}

/* A new connected socket to the upstream; -1 with an exception set if none can be made. */
static int new_sock(Forwarder *f, double now) {
    int index = -1;
    for (int i = 0; i < f->sock_slots; i++)
        if (f->sock[i].fd < 0) {
            index = i;
            break;
        }
    if (index < 0) {
        int grown = f->sock_slots ? 2 * f->sock_slots : 16;
        Sock *more = PyMem_Realloc(f->sock, sizeof(Sock) * (size_t)grown);
        if (more == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (int i = f->sock_slots; i < grown; i++) {
            more[i].fd = -1;
            more[i].gen = 0;
        }
        index = f->sock_slots;
        f->sock = more;
        f->sock_slots = grown;
    }
    int fd = socket(f->address.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    /* Connected: the kernel picks a random port, filters other sources, reports port unreachable. */
    if (connect(fd, (struct sockaddr *)&f->address, f->address_len) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        close(fd);
        return -1;
    }
    Sock *s = &f->sock[index];
    s->fd = fd;
    s->gen++;
    s->taken = s->sent = s->waiting = s->retired = 0;
    s->opened = now;
    struct epoll_event event = {.events = EPOLLIN, .data.u64 = ((uint64_t)s->gen << 32) | (uint32_t)index};
    if (epoll_ctl(f->epoll, EPOLL_CTL_ADD, fd, &event) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        close(fd);
        s->fd = -1;
        return -1;
    }
    f->sockets++;
    return index;
}

/* Header h of a sendmmsg or recvmmsg batch, for the one buffer at base, len bytes, through v. */
static void one_buffer(struct mmsghdr *h, struct iovec *v, void *base, size_t len) {
    v->iov_base = base;
    v->iov_len = len;
    memset(h, 0, sizeof(*h));
    h->msg_hdr.msg_iov = v;
    h->msg_hdr.msg_iovlen = 1;
}

static uint16_t random_id(Forwarder *f) {
    if (f->random_left == 0) {
        size_t want = sizeof(f->random_ids), got = 0;
        while (got < want) {
            ssize_t n = getrandom((uint8_t *)f->random_ids + got, want - got, 0);
            if (n > 0)
                got += (size_t)n;
        }
        f->random_left = (int)(want / sizeof(uint16_t));
    }
    return f->random_ids[--f->random_left];
}

/* -- handing back --------------------------------------------------------------- */

/* Append (reason, upstream, rtt or None, waiters) to returned and end the flight. */
static int hand_back(Forwarder *f, int index, const char *reason, double rtt, PyObject *returned) {
    Flight *fl = &f->flight[index];
    PyObject *item = rtt < 0 ? Py_BuildValue("(sOOO)", reason, fl->upstream, Py_None, fl->waiters)
                             : Py_BuildValue("(sOdO)", reason, fl->upstream, rtt, fl->waiters);
    int failed = item == NULL || PyList_Append(returned, item) < 0;
    Py_XDECREF(item);
    end_flight(f, index);
    return failed ? -1 : 0;
}

/* Every flight still waiting on socket index, handed back with reason. */
static int hand_back_all(Forwarder *f, int index, const char *reason, PyObject *returned) {
    Sock *s = &f->sock[index];
    int status = 0;
    for (int i = 0; i < s->taken; i++)
        if (s->flights[i] >= 0) {
            if (hand_back(f, s->flights[i], reason, -1.0, returned) < 0)
                status = -1;
            s->flights[i] = -1;
            s->waiting--;
        }
    s->sent = s->taken; /* nothing left to send */
    s->retired = 1;
    close_if_done(f, index);
    return status;
}

static const char *errno_reason(int error) { return error == ECONNREFUSED ? "refused" : "network"; }

/* -- the Python methods ------------------------------------------------------- */

/* A clock reading from Python; -1 with an exception set if it is not a number. */
static int time_of(PyObject *arg, double *now) {
    *now = PyFloat_AsDouble(arg);
    return *now == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* *slot holds value from now on. */
static void keep(PyObject **slot, PyObject *value) {
    Py_INCREF(value);
    Py_XSETREF(*slot, value);
}

static int Forwarder_init(Forwarder *f, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"plain_query", "parse_answer", "assemble", "cut", NULL};
    PyObject *plain_query, *parse_answer, *assemble, *cut;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO", names, &plain_query, &parse_answer, &assemble, &cut))
        return -1;
    if (f->epoll > 0) {
        PyErr_SetString(PyExc_RuntimeError, "a Forwarder is made once");
        return -1;
    }
    f->epoll = epoll_create1(EPOLL_CLOEXEC);
    if (f->epoll < 0) {
        f->epoll = 0;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    f->flights = PyDict_New();
    f->owned = PyDict_New();
    if (f->flights == NULL || f->owned == NULL)
        return -1;
    keep(&f->plain_query, plain_query);
    keep(&f->parse_answer, parse_answer);
    keep(&f->assemble, assemble);
    keep(&f->cut, cut);
    f->current = -1;
    f->free_flight = -1;
    return 0;
}

PyDoc_STRVAR(configure_doc,
             "configure(upstream, host, port, *, timeout, cap, share, decline, single_label, learn, view,\n"
             "          put, their_flights, their_owned)\n\n"
             "Forward from now on to upstream (an Upstream, reached at host and port, an IP address);\n"
             "upstream None: take nothing. Flights under way finish where they went. decline: the\n"
             "lowercase wire-form suffixes of names left to the resolver; single_label: leave one-label\n"
             "names to it too; cached: the cache's entries by key (a question there is left to the\n"
             "resolver); put(key, answer, now): the cache's, as the resolver stores an answer\n"
             "(returning it as stored, or None); their_flights, their_owned: the resolver's in-flight table and its\n"
             "count by owner, counted against cap and share with this one's.");

static PyObject *configure(Forwarder *f, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"upstream", "host", "port", "timeout", "cap", "share", "decline", "single_label",
                            "learn", "view", "put", "cached", "their_flights", "their_owned", NULL};
    PyObject *upstream, *host = NULL, *decline = NULL, *learn = NULL, *view = NULL, *put = NULL, *cached = NULL;
    PyObject *their_flights = NULL, *their_owned = NULL;
    int port = 0, single_label = 0;
    double timeout = 0.0;
    Py_ssize_t cap = 0, share = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|Oi$dnnO!pOO!OO!O!O!", names, &upstream, &host, &port, &timeout,
                                     &cap, &share, &PyTuple_Type, &decline, &single_label, &learn, &PyBytes_Type,
                                     &view, &put, &PyDict_Type, &cached, &PyDict_Type, &their_flights, &PyDict_Type,
                                     &their_owned))
        return NULL;
    if (upstream == Py_None) { /* takes nothing from now on; what is under way finishes */
        retire_current(f);
        Py_CLEAR(f->upstream);
        Py_RETURN_NONE;
    }
    if (host == NULL || decline == NULL || learn == NULL || view == NULL || put == NULL || cached == NULL ||
        their_flights == NULL || their_owned == NULL) {
        PyErr_SetString(PyExc_TypeError, "configure: every argument is needed for an upstream");
        return NULL;
    }
    struct sockaddr_storage address;
    socklen_t address_len = 0;
    memset(&address, 0, sizeof(address));
    const char *text = PyUnicode_AsUTF8(host);
    if (text == NULL)
        return NULL;
    struct sockaddr_in *v4 = (struct sockaddr_in *)&address;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&address;
    if (port <= 0 || port > 65535) {
        PyErr_Format(PyExc_ValueError, "not a port: %d", port);
        return NULL;
    }
    if (inet_pton(AF_INET, text, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        address_len = sizeof(*v4);
    } else if (inet_pton(AF_INET6, text, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        address_len = sizeof(*v6);
    } else {
        PyErr_Format(PyExc_ValueError, "not an IP address: %R", host);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(decline); i++)
        if (!PyBytes_Check(PyTuple_GET_ITEM(decline, i))) {
            PyErr_SetString(PyExc_TypeError, "decline: a tuple of bytes");
            return NULL;
        }
    /* The socket taking queries goes to the old address: with a new one, it takes no more. */
    if (address_len != f->address_len || memcmp(&address, &f->address, address_len) != 0)
        retire_current(f);
    keep(&f->upstream, upstream);
    f->address = address;
    f->address_len = address_len;
    f->timeout = timeout;
    f->cap = cap;
    f->share = share;
    f->single_label = single_label;
    keep(&f->decline, decline);
    keep(&f->learn, learn);
    keep(&f->view, view);
    keep(&f->put, put);
    keep(&f->cached, cached);
    keep(&f->their_flights, their_flights);
    keep(&f->their_owned, their_owned);
    Py_RETURN_NONE;
}

/* Whether the lowercase name (wire form, length n) ends with one of decline's suffixes at a label boundary. */
static int declined(Forwarder *f, const uint8_t *name, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(f->decline); i++) {
        PyObject *suffix = PyTuple_GET_ITEM(f->decline, i);
        Py_ssize_t m = PyBytes_GET_SIZE(suffix);
        if (m > n || memcmp(name + n - m, PyBytes_AS_STRING(suffix), (size_t)m) != 0)
            continue;
        Py_ssize_t offset = 0;
        while (offset < n - m)
            offset += name[offset] + 1;
        if (offset == n - m)
            return 1;
    }
    return 0;
}

static long count_in(PyObject *dict, PyObject *owner) {
    PyObject *count = PyDict_GetItemWithError(dict, owner);
    return count == NULL ? 0 : PyLong_AsLong(count);
}

PyDoc_STRVAR(take_doc,
             "take(query, source, ctx, owner, now) -> bool\n\n"
             "Forward query (from source, to be answered through ctx.send; owner: the client's prefix,\n"
             "None if held to no share) if it is one this forwarder takes: True if it did (or it\n"
             "joined an identical forward), False if it is the resolver's.");

static PyObject *take(Forwarder *f, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "take(query, source, ctx, owner, now)");
        return NULL;
    }
    PyObject *query = args[0], *source = args[1], *ctx = args[2], *owner = args[3];
    double now;
    if (time_of(args[4], &now) < 0)
        return NULL;
    if (f->upstream == NULL || f->put == NULL || !PyBytes_Check(query))
        Py_RETURN_FALSE;
    PyObject *fields = PyObject_CallOneArg(f->plain_query, query);
    if (fields == NULL)
        return NULL;
    if (fields == Py_None || !PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) != 7) {
        Py_DECREF(fields);
        Py_RETURN_FALSE;
    }
    /* (flags, qname, qtype, qclass, edns, payload, do) */
    PyObject *qname = PyTuple_GET_ITEM(fields, 1);
    unsigned long flags = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(fields, 0));
    unsigned long qtype = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(fields, 2));
    unsigned long qclass = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(fields, 3));
    int do_bit = PyTuple_GET_ITEM(fields, 6) == Py_True;
    Py_ssize_t n = PyBytes_GET_SIZE(qname);
    uint8_t lower[256];
    if (PyErr_Occurred())
        goto error;
    if (n > 255 || n < 1) /* never from plain_query */
        goto decline;
    /* The resolver's: meta types, ANY (answered minimally), other classes, the root. */
    if (qtype == T_ANY || (qtype >= 249 && qtype <= 254) || qtype == 41 || qclass != C_IN || n == 1)
        goto decline;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t c = (uint8_t)PyBytes_AS_STRING(qname)[i];
        lower[i] = c >= 'A' && c <= 'Z' ? (uint8_t)(c + 32) : c; /* length bytes are below 64: never changed */
    }
    if ((f->single_label && lower[0] + 2 == n) || declined(f, lower, n))
        goto decline;
    /* cache.cache_key: "!HHBB" (qtype, qclass, DO, the name's length), the name, the view. */
    Py_ssize_t view_len = PyBytes_GET_SIZE(f->view);
    PyObject *key = PyBytes_FromStringAndSize(NULL, 6 + n + view_len);
    if (key == NULL)
        goto error;
    uint8_t *k = (uint8_t *)PyBytes_AS_STRING(key);
    k[0] = (uint8_t)(qtype >> 8), k[1] = (uint8_t)qtype, k[2] = (uint8_t)(qclass >> 8), k[3] = (uint8_t)qclass;
    k[4] = (uint8_t)do_bit, k[5] = (uint8_t)n;
    memcpy(k + 6, lower, (size_t)n);
    memcpy(k + 6 + n, PyBytes_AS_STRING(f->view), (size_t)view_len);
    PyObject *waiter = PyTuple_Pack(5, query, source, ctx, owner, fields);
    if (waiter == NULL) {
        Py_DECREF(key);
        goto error;
    }
    PyObject *found = PyDict_GetItemWithError(f->flights, key);
    if (found != NULL) {
        int index = (int)PyLong_AsLong(found);
        int failed = PyList_Append(f->flight[index].waiters, waiter);
        Py_DECREF(waiter), Py_DECREF(key), Py_DECREF(fields);
        if (failed < 0)
            return NULL;
        f->taken++, f->merged++;
        Py_RETURN_TRUE;
    }
    if (PyErr_Occurred() || PyDict_GET_SIZE(f->flights) + PyDict_GET_SIZE(f->their_flights) >= f->cap ||
        PyDict_Contains(f->cached, key) != 0 || PyDict_Contains(f->their_flights, key) != 0 ||
        (owner != Py_None && count_in(f->owned, owner) + count_in(f->their_owned, owner) >= f->share)) {
        /* Cached, full, or the resolver forwards it already: the resolver answers, merges, or refuses and counts. */
        Py_DECREF(waiter), Py_DECREF(key);
        if (PyErr_Occurred())
            goto error;
        goto decline;
    }
    if (f->current < 0 || worn(&f->sock[f->current], now)) {
        retire_current(f);
        f->current = new_sock(f, now);
        if (f->current < 0) { /* out of descriptors, say: the resolver's to try, fail and count */
            Py_DECREF(waiter), Py_DECREF(key);
            if (PyErr_ExceptionMatches(PyExc_MemoryError))
                goto error;
            PyErr_Clear();
            f->socket_errors++;
            goto decline;
        }
    }
    Sock *s = &f->sock[f->current];
    uint16_t id;
    int clash;
    do { /* unique within the socket: an answer finds its query by ID */
        id = random_id(f);
        clash = 0;
        for (int i = 0; i < s->taken; i++)
            clash |= s->ids[i] == id;
    } while (clash);
    /* wire.forward_query: RD and the client's CD, the question as written, our OPT with the client's DO. */
    Py_ssize_t size = HEADER_LEN + n + 4 + OPT_SIZE;
    PyObject *wire = PyBytes_FromStringAndSize(NULL, size);
    int index = wire == NULL ? -1 : new_flight(f);
    PyObject *value = index < 0 ? NULL : PyLong_FromLong(index);
    if (value == NULL || PyDict_SetItem(f->flights, key, value) < 0) {
        if (index >= 0) {
            f->flight[index].next_free = f->free_flight;
            f->free_flight = index;
        }
        Py_XDECREF(value), Py_XDECREF(wire), Py_DECREF(waiter), Py_DECREF(key);
        goto error;
    }
    Py_DECREF(value);
    uint8_t *w = (uint8_t *)PyBytes_AS_STRING(wire);
    unsigned out_flags = RD | (flags & CD);
    const uint8_t header[HEADER_LEN] = {id >> 8, id & 0xFF, out_flags >> 8, out_flags & 0xFF, 0, 1, 0, 0, 0, 0, 0, 1};
    memcpy(w, header, HEADER_LEN);
    memcpy(w + HEADER_LEN, PyBytes_AS_STRING(qname), (size_t)n);
    uint8_t *tail = w + HEADER_LEN + n;
    const uint8_t rest[4 + OPT_SIZE] = {
        qtype >> 8, qtype & 0xFF, qclass >> 8, qclass & 0xFF, 0, 0, 41, OUR_PAYLOAD >> 8, OUR_PAYLOAD & 0xFF,
        0, 0, do_bit ? 0x80 : 0, 0, 0, 0};
    memcpy(tail, rest, sizeof(rest));
    Flight *fl = &f->flight[index];
    fl->key = key;
    fl->waiters = PyList_New(1);
    if (fl->waiters == NULL) {
        Py_DECREF(waiter), Py_DECREF(wire);
        fl->owner = Py_None, Py_INCREF(Py_None);
        end_flight(f, index);
        goto error;
    }
    PyList_SET_ITEM(fl->waiters, 0, waiter);
    Py_INCREF(owner), fl->owner = owner;
    Py_INCREF(f->upstream), fl->upstream = f->upstream;
    Py_INCREF(qname), fl->qname = qname;
    fl->wire = wire;
    fl->qtype = (unsigned)qtype, fl->qclass = (unsigned)qclass;
    fl->sent = now;
    fl->deadline = now + f->timeout;
    s->ids[s->taken] = id;
    s->flights[s->taken] = index;
    s->taken++;
    s->waiting++;
    if (owner != Py_None) {
        PyObject *count = PyLong_FromLong(count_in(f->owned, owner) + 1);
        if (count == NULL || PyDict_SetItem(f->owned, owner, count) < 0) {
            Py_XDECREF(count);
            Py_DECREF(fields);
            return NULL;
        }
        Py_DECREF(count);
    }
    Py_DECREF(fields);
    f->taken++, f->forwarded++;
    Py_RETURN_TRUE;
decline:
    Py_DECREF(fields);
    Py_RETURN_FALSE;
error:
    Py_DECREF(fields);
    return NULL;
}

PyDoc_STRVAR(send_doc,
             "send() -> list\n\n"
             "Send every query taken since the last call, a system call per socket. Returns the\n"
             "forwards that could not be sent, as readable() does.");

static PyObject *send_taken(Forwarder *f, PyObject *unused) {
    PyObject *returned = PyList_New(0);
    if (returned == NULL)
        return NULL;
    for (int index = 0; index < f->sock_slots; index++) {
        Sock *s = &f->sock[index];
        if (s->fd < 0)
            continue;
        while (s->sent < s->taken) {
            struct mmsghdr headers[BURST];
            struct iovec vectors[BURST];
            int count = 0;
            for (int i = s->sent; i < s->taken; i++, count++) {
                int flight = s->flights[i];
                PyObject *wire = flight >= 0 ? f->flight[flight].wire : NULL;
                one_buffer(&headers[count], &vectors[count], wire ? PyBytes_AS_STRING(wire) : NULL,
                           wire ? (size_t)PyBytes_GET_SIZE(wire) : 0);
            }
            int sent = sendmmsg(s->fd, headers, (unsigned)count, MSG_DONTWAIT);
            if (sent > 0) {
                s->sent += sent;
                continue;
            }
            /* The first could not go: it fails on its own, the rest go on. */
            int error = errno;
            f->send_errors++;
            int flight = s->flights[s->sent];
            if (flight >= 0) {
                s->flights[s->sent] = -1;
                s->waiting--;
                if (hand_back(f, flight, errno_reason(error), -1.0, returned) < 0) {
                    Py_DECREF(returned);
                    return NULL;
                }
            }
            s->sent++;
        }
        close_if_done(f, index); /* every query on it failed to go */
    }
    return returned;
}

/* The replies to the waiters of a flight answered with answer (a wire.WireAnswer), appended to replies;
 * a waiter whose reply cannot be made (an answer scan.answer read but assemble cannot write: none is
 * known) goes back to the resolver, which answers it from the cache or with SERVFAIL. -1: no memory. */
static int reply_all(Forwarder *f, int flight, PyObject *answer, PyObject *replies, PyObject *returned) {
    PyObject *waiters = f->flight[flight].waiters;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(waiters); i++) {
        PyObject *waiter = PyList_GET_ITEM(waiters, i);
        PyObject *query = PyTuple_GET_ITEM(waiter, 0), *fields = PyTuple_GET_ITEM(waiter, 4);
        long edns = PyLong_AsLong(PyTuple_GET_ITEM(fields, 4));
        long payload = PyLong_AsLong(PyTuple_GET_ITEM(fields, 5));
        Py_ssize_t question = PyBytes_GET_SIZE(PyTuple_GET_ITEM(fields, 1)) + 4;
        PyObject *id = PyBytes_FromStringAndSize(PyBytes_AS_STRING(query), 2);
        PyObject *asked = PyBytes_FromStringAndSize(PyBytes_AS_STRING(query) + HEADER_LEN, question);
        PyObject *has_edns = edns >= 0 ? Py_True : Py_False;
        PyObject *reply = NULL;
        if (id != NULL && asked != NULL) {
            PyObject *argv[] = {id, PyTuple_GET_ITEM(fields, 0), asked, answer, has_edns, PyTuple_GET_ITEM(fields, 6)};
            reply = PyObject_Vectorcall(f->assemble, argv, 6, NULL);
        }
        Py_XDECREF(id), Py_XDECREF(asked);
        /* message.Query.size_limit over UDP: 512 without EDNS, else its payload within 512..1232. */
        long limit = edns < 0 ? CLASSIC_UDP_LIMIT
                     : payload < CLASSIC_UDP_LIMIT ? CLASSIC_UDP_LIMIT
                     : payload > OUR_PAYLOAD ? OUR_PAYLOAD
                                             : payload;
        if (reply != NULL && PyBytes_GET_SIZE(reply) > limit) {
            PyObject *size = PyLong_FromLong(limit);
            PyObject *argv[] = {reply, answer, size, has_edns};
            PyObject *cut = size ? PyObject_Vectorcall(f->cut, argv, 4, NULL) : NULL;
            Py_XDECREF(size);
            Py_SETREF(reply, cut);
        }
        PyObject *item = NULL;
        int made = reply != NULL && PyBytes_Check(reply) && PyBytes_GET_SIZE(reply) > 3;
        if (made) {
            f->rcodes[PyBytes_AS_STRING(reply)[3] & 0x0F]++;
            item = PyTuple_Pack(4, PyTuple_GET_ITEM(waiter, 2), reply, PyTuple_GET_ITEM(waiter, 1),
                                PyTuple_GET_ITEM(waiter, 3));
        } else {
            PyErr_Clear();
            f->render_errors++;
            PyObject *alone = PyList_New(1);
            if (alone != NULL) {
                Py_INCREF(waiter);
                PyList_SET_ITEM(alone, 0, waiter);
                item = Py_BuildValue("(sOON)", "render", f->flight[flight].upstream, Py_None, alone);
            }
        }
        Py_XDECREF(reply);
        if (item == NULL || PyList_Append(made ? replies : returned, item) < 0) {
            Py_XDECREF(item);
            return -1;
        }
        Py_DECREF(item);
    }
    return 0;
}

/* Calls fn(*argv); on an exception (none is expected of the worker's own functions) the flight is
 * handed back, so no client is left unanswered: NULL then, with *handed set to hand_back's status. */
static PyObject *call_or_hand_back(Forwarder *f, int flight, PyObject *fn, PyObject *const *argv, size_t n,
                                   double rtt, PyObject *returned, int *handed) {
    PyObject *result = PyObject_Vectorcall(fn, argv, n, NULL);
    if (result == NULL) {
        if (PyErr_ExceptionMatches(PyExc_MemoryError)) {
            *handed = -1;
            return NULL;
        }
        PyErr_Clear();
        f->internal_errors++;
        *handed = hand_back(f, flight, "internal", rtt, returned);
    }
    return result;
}

/* An answer (n bytes at data) to the flight at slot i of socket index. -1: no memory. */
static int answered(Forwarder *f, int index, int i, const uint8_t *data, Py_ssize_t n, double now, PyObject *replies,
                    PyObject *done, PyObject *returned) {
    Sock *s = &f->sock[index];
    int flight = s->flights[i];
    s->flights[i] = -1;
    s->waiting--;
    Flight *fl = &f->flight[flight];
    double rtt = now > fl->sent ? now - fl->sent : 0.0;
    if (data[2] & TC)
        return hand_back(f, flight, "truncated", rtt, returned);
    PyObject *wire = PyBytes_FromStringAndSize((const char *)data, n);
    PyObject *qtype = PyLong_FromUnsignedLong(fl->qtype), *qclass = PyLong_FromUnsignedLong(fl->qclass);
    PyObject *answer = NULL;
    int handed = 0;
    if (wire != NULL && qtype != NULL && qclass != NULL) {
        PyObject *argv[] = {wire, fl->qname, qtype, qclass, f->learn};
        answer = call_or_hand_back(f, flight, f->parse_answer, argv, 5, rtt, returned, &handed);
    } else {
        handed = -1;
    }
    Py_XDECREF(wire), Py_XDECREF(qtype), Py_XDECREF(qclass);
    if (answer == NULL)
        return handed;
    if (PyUnicode_Check(answer)) { /* why it is no answer: malformed, question_mismatch... */
        const char *why = PyUnicode_AsUTF8(answer);
        int status = why == NULL ? -1 : hand_back(f, flight, why, rtt, returned);
        Py_DECREF(answer);
        return status;
    }
    int rcode = data[3] & 0x0F;
    if (rcode == RCODE_SERVFAIL || rcode == RCODE_REFUSED) { /* maybe that server's alone: the next one's turn */
        Py_DECREF(answer);
        return hand_back(f, flight, rcode == RCODE_SERVFAIL ? "servfail" : "refused", rtt, returned);
    }
    PyObject *when = PyFloat_FromDouble(now);
    PyObject *stored = NULL;
    if (when != NULL) {
        PyObject *argv[] = {fl->key, answer, when};
        /* The answer as cached (TTLs clamped), or None if not cached. */
        stored = call_or_hand_back(f, flight, f->put, argv, 3, rtt, returned, &handed);
        Py_DECREF(when);
    } else {
        handed = -1;
    }
    if (stored == NULL) {
        Py_DECREF(answer);
        return handed;
    }
    f->answers++;
    int status = reply_all(f, flight, stored == Py_None ? answer : stored, replies, returned);
    Py_DECREF(stored);
    PyObject *item = status < 0 ? NULL : Py_BuildValue("(OdO)", fl->upstream, rtt, answer);
    Py_DECREF(answer);
    if (item == NULL || PyList_Append(done, item) < 0)
        status = -1;
    Py_XDECREF(item);
    end_flight(f, flight);
    return status;
}

/* Received datagrams: BATCH slots of ANSWER_SIZE bytes, shared by every Forwarder (the GIL is held). */
static uint8_t in_buffer[BATCH][ANSWER_SIZE];

static int read_sock(Forwarder *f, int index, double now, PyObject *replies, PyObject *done, PyObject *returned) {
    Sock *s = &f->sock[index];
    int want = s->waiting < 1 ? 1 : s->waiting > BATCH ? BATCH : s->waiting;
    struct mmsghdr headers[BATCH];
    struct iovec vectors[BATCH];
    for (int i = 0; i < want; i++)
        one_buffer(&headers[i], &vectors[i], in_buffer[i], ANSWER_SIZE);
    int got = recvmmsg(s->fd, headers, (unsigned)want, MSG_DONTWAIT, NULL);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return 0;
        return hand_back_all(f, index, errno_reason(errno), returned); /* every query here went there */
    }
    for (int m = 0; m < got; m++) {
        const uint8_t *data = in_buffer[m];
        Py_ssize_t n = headers[m].msg_len;
        if (headers[m].msg_hdr.msg_flags & MSG_TRUNC) {
            f->oversized++;
            continue;
        }
        int slot = -1;
        if (n >= HEADER_LEN && data[2] & QR) {
            uint16_t id = (uint16_t)((data[0] << 8) | data[1]);
            for (int i = 0; i < s->taken; i++)
                if (s->flights[i] >= 0 && s->ids[i] == id && i < s->sent)
                    slot = i;
        }
        if (slot < 0) {
            f->mismatched++; /* late, stray or spoofed: keep waiting */
            continue;
        }
        if (answered(f, index, slot, data, n, now, replies, done, returned) < 0)
            return -1;
    }
    close_if_done(f, index);
    return 0;
}

PyDoc_STRVAR(readable_doc,
             "readable(now) -> (replies, answered, returned)\n\n"
             "Read the answers that came: replies, [(ctx, reply, source, owner)], for each waiter of each\n"
             "forward answered (its answer cached by put first); answered, [(upstream, rtt, answer)],\n"
             "one for each; returned, [(reason, upstream, rtt or None, waiters)], the forwards handed\n"
             "back (reason: truncated, servfail, refused, network, or why parse_answer refused the\n"
             "answer), waiters as [(query, source, ctx, owner, fields)].");

static PyObject *readable(Forwarder *f, PyObject *arg) {
    double now;
    if (time_of(arg, &now) < 0)
        return NULL;
    struct epoll_event events[BATCH];
    int ready = epoll_wait(f->epoll, events, BATCH, 0);
    if (ready < 0 && errno != EINTR)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *replies = PyList_New(0), *done = PyList_New(0), *returned = PyList_New(0);
    if (replies == NULL || done == NULL || returned == NULL)
        goto error;
    for (int e = 0; e < ready; e++) {
        uint32_t index = (uint32_t)events[e].data.u64, gen = (uint32_t)(events[e].data.u64 >> 32);
        if ((int)index >= f->sock_slots || f->sock[index].fd < 0 || f->sock[index].gen != gen)
            continue; /* closed since */
        if (read_sock(f, (int)index, now, replies, done, returned) < 0)
            goto error;
    }
    return Py_BuildValue("(NNN)", replies, done, returned);
error:
    Py_XDECREF(replies), Py_XDECREF(done), Py_XDECREF(returned);
    return NULL;
}

PyDoc_STRVAR(expire_doc,
             "expire(now) -> list\n\n"
             "The forwards unanswered by now (timeout), handed back as readable() returns them; the\n"
             "socket taking queries takes no more if it has for long enough.");

static PyObject *expire(Forwarder *f, PyObject *arg) {
    double now;
    if (time_of(arg, &now) < 0)
        return NULL;
    PyObject *returned = PyList_New(0);
    if (returned == NULL)
        return NULL;
    if (f->current >= 0 && worn(&f->sock[f->current], now))
        retire_current(f);
    for (int index = 0; index < f->sock_slots; index++) {
        Sock *s = &f->sock[index];
        if (s->fd < 0)
            continue;
        for (int i = 0; i < s->sent; i++) {
            int flight = s->flights[i];
            if (flight < 0 || f->flight[flight].deadline > now)
                continue;
            s->flights[i] = -1;
            s->waiting--;
            if (hand_back(f, flight, "timeout", -1.0, returned) < 0) {
                Py_DECREF(returned);
                return NULL;
            }
        }
        close_if_done(f, index);
    }
    return returned;
}

PyDoc_STRVAR(owned_doc, "owned(owner) -> int\n\nThe forwards under way here that owner started.");

static PyObject *owned(Forwarder *f, PyObject *owner) {
    long count = count_in(f->owned, owner);
    return count < 0 && PyErr_Occurred() ? NULL : PyLong_FromLong(count);
}

PyDoc_STRVAR(counters_doc,
             "counters() -> dict\n\n"
             "What it did, under the names the resolver and transport count the same under.");

static PyObject *counters(Forwarder *f, PyObject *unused) {
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsKsKsK}", "queries_udp", f->taken, "forwarded", f->forwarded,
                         "forwarded_native", f->forwarded, "upstream_udp_socket_errors", f->socket_errors,
                         "upstream_queries_udp", f->forwarded, "merged",
                         f->merged, "upstream_answers", f->answers, "upstream_sockets_udp", f->sockets,
                         "upstream_udp_mismatched", f->mismatched, "upstream_udp_oversized", f->oversized,
                         "upstream_udp_send_errors", f->send_errors, "render_errors", f->render_errors,
                         "forwarder_errors", f->internal_errors);
}

PyDoc_STRVAR(rcodes_doc, "rcodes() -> dict\n\nThe replies made, by rcode (the header's four bits).");

static PyObject *rcodes(Forwarder *f, PyObject *unused) {
    PyObject *out = PyDict_New();
    for (int rcode = 0; out != NULL && rcode < 16; rcode++) {
        if (!f->rcodes[rcode])
            continue;
        PyObject *key = PyLong_FromLong(rcode), *value = PyLong_FromUnsignedLongLong(f->rcodes[rcode]);
        if (key == NULL || value == NULL || PyDict_SetItem(out, key, value) < 0)
            Py_CLEAR(out);
        Py_XDECREF(key), Py_XDECREF(value);
    }
    return out;
}

static PyObject *fileno_of(Forwarder *f, PyObject *unused) { return PyLong_FromLong(f->epoll); }

PyDoc_STRVAR(close_doc,
             "close() -> list\n\n"
             "Close every socket; the forwards under way are handed back (closed), as readable() does.");

static PyObject *close_all(Forwarder *f, PyObject *unused) {
    PyObject *returned = PyList_New(0);
    if (returned == NULL)
        return NULL;
    for (int index = 0; index < f->sock_slots; index++)
        if (f->sock[index].fd >= 0 && hand_back_all(f, index, "closed", returned) < 0) {
            Py_DECREF(returned);
            return NULL;
        }
    Py_CLEAR(f->upstream);
    return returned;
}

static Py_ssize_t length(Forwarder *f) { return PyDict_GET_SIZE(f->flights); }

PyDoc_STRVAR(busy_doc,
             "busy() -> bool\n\n"
             "Whether expire() has anything to do: forwards under way, or a socket taking queries.");

static PyObject *busy(Forwarder *f, PyObject *unused) { return PyBool_FromLong(length(f) > 0 || f->current >= 0); }

static void Forwarder_dealloc(Forwarder *f) {
    for (int index = 0; index < f->sock_slots; index++)
        if (f->sock[index].fd >= 0)
            close(f->sock[index].fd);
    for (int i = 0; i < f->flight_slots; i++)
        if (f->flight[i].key != NULL) {
            Py_CLEAR(f->flight[i].key);
            Py_CLEAR(f->flight[i].waiters);
            Py_CLEAR(f->flight[i].owner);
            Py_CLEAR(f->flight[i].upstream);
            Py_CLEAR(f->flight[i].qname);
            Py_CLEAR(f->flight[i].wire);
        }
    PyMem_Free(f->flight);
    PyMem_Free(f->sock);
    if (f->epoll > 0)
        close(f->epoll);
    Py_XDECREF(f->plain_query), Py_XDECREF(f->parse_answer);
    Py_XDECREF(f->assemble), Py_XDECREF(f->cut), Py_XDECREF(f->upstream), Py_XDECREF(f->decline);
    Py_XDECREF(f->learn), Py_XDECREF(f->view), Py_XDECREF(f->their_flights), Py_XDECREF(f->their_owned);
    Py_XDECREF(f->put), Py_XDECREF(f->cached);
    Py_XDECREF(f->flights), Py_XDECREF(f->owned);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS, configure_doc},
    {"take", (PyCFunction)(void (*)(void))take, METH_FASTCALL, take_doc},
    {"send", (PyCFunction)send_taken, METH_NOARGS, send_doc},
    {"readable", (PyCFunction)readable, METH_O, readable_doc},
    {"expire", (PyCFunction)expire, METH_O, expire_doc},
    {"owned", (PyCFunction)owned, METH_O, owned_doc},
    {"busy", (PyCFunction)busy, METH_NOARGS, busy_doc},
    {"counters", (PyCFunction)counters, METH_NOARGS, counters_doc},
    {"rcodes", (PyCFunction)rcodes, METH_NOARGS, rcodes_doc},
    {"fileno", (PyCFunction)fileno_of, METH_NOARGS, "The epoll descriptor that is readable when answers wait."},
    {"close", (PyCFunction)close_all, METH_NOARGS, close_doc},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods sequence = {.sq_length = (lenfunc)length};

static PyTypeObject ForwarderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "meshsup.actors.dns.forwarder.Forwarder",
    .tp_basicsize = sizeof(Forwarder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The plain UDP forward in C: see forwarder.c.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Forwarder_init,
    .tp_dealloc = (destructor)Forwarder_dealloc,
    .tp_methods = methods,
    .tp_as_sequence = &sequence,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "meshsup.actors.dns.forwarder", "The plain UDP forward in C: see forwarder.c.", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_forwarder(void) {
    if (PyType_Ready(&ForwarderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ForwarderType);
    if (PyModule_AddObject(m, "Forwarder", (PyObject *)&ForwarderType) < 0) {
        Py_DECREF(&ForwarderType);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *life = PyFloat_FromDouble(SOCKET_LIFE);
    if (PyModule_AddIntConstant(m, "BURST", BURST) < 0 || PyModule_AddObject(m, "SOCKET_LIFE", life) < 0) {
        Py_XDECREF(life);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
