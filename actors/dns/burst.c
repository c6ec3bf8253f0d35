/* meshsup.actors.dns.burst: a burst of upstream UDP queries out in one
 * system call, their answers in in one (sendmmsg(2), recvmmsg(2)), on the
 * connected socket the burst owns (transport.py's _UdpSocket); and a
 * listener's queries in with their senders, its replies out to them, in one
 * each (receive_from, send_to: server.py's _UdpListener).
 *
 * A cold forward used to cost a send() and a recv() of its own, each a
 * system call and a Python call with its objects; a burst of up to 16
 * queries now costs one of each. What is sent and received is decided in
 * Python (IDs, matching answers to queries, timeouts); this only moves bytes.
 *
 * Nothing is read here but what the kernel wrote and the Python objects
 * given: every length is checked before use (a datagram's against its
 * buffer, a query's against the ID it carries), and the GIL is held
 * throughout (the sockets are non-blocking), so the buffers are this
 * module's alone.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#define MAX_BATCH 64       /* datagrams per call, either way */
#define MAX_DATAGRAM 65536 /* the most a UDP payload can be */

/* Received datagrams, MAX_BATCH slots of `slot` bytes; grown when a call asks for larger slots. */
static uint8_t *in_buffer;
static Py_ssize_t in_slot;

/* Slots of at least `slot` bytes; -1 with an exception set if there is no memory for them. */
static int grow(Py_ssize_t slot) {
    if (slot <= in_slot)
        return 0;
    uint8_t *grown = PyMem_Realloc(in_buffer, (size_t)(slot * MAX_BATCH));
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    in_buffer = grown;
    in_slot = slot;
    return 0;
}

PyDoc_STRVAR(send_doc,
"send(fd, ids, queries, start) -> int\n\n"
"Send queries[start:] (at most 64) on the connected socket fd, each with its\n"
"first two bytes replaced by the matching ID of ids (0..65535); the number\n"
"sent, at least 1. OSError if not even the first could be sent.");

/* A file descriptor from a Python int; -1 with an exception set if it is not one. */
static int descriptor(PyObject *value) {
    long fd = PyLong_AsLong(value);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return -1;
    }
    return (int)fd;
}

/* send's and send_to's arguments (fd, first list, second list, start): two lists of one length
 * `total` and a start within them; -1 with an exception set if they are not. */
static int sending_args(PyObject *const *args, Py_ssize_t nargs, const char *name, const char *first,
                        const char *second, int *fd, Py_ssize_t *start, Py_ssize_t *total) {
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "%s(fd, %s, %s, start)", name, first, second);
        return -1;
    }
    if ((*fd = descriptor(args[0])) < 0)
        return -1;
    *start = PyLong_AsSsize_t(args[3]);
    if (*start == -1 && PyErr_Occurred())
        return -1;
    if (!PyList_CheckExact(args[1]) || !PyList_CheckExact(args[2])) {
        PyErr_Format(PyExc_TypeError, "%s and %s must be lists", first, second);
        return -1;
    }
    *total = PyList_GET_SIZE(args[2]);
    if (PyList_GET_SIZE(args[1]) != *total || *start < 0 || *start >= *total) {
        PyErr_Format(PyExc_ValueError, "%s: %s and %s differ in length, or start is out of range", name, first, second);
        return -1;
    }
    return 0;
}

/* What send and send_to return for sendmmsg's result: the number sent, or OSError. */
static PyObject *sent_count(int sent) {
    if (sent < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (sent == 0) { /* not for a datagram socket; a would-block all the same */
        errno = EAGAIN;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(sent);
}

static PyObject *burst_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int fd;
    Py_ssize_t start, total;
    if (sending_args(args, nargs, "send", "ids", "queries", &fd, &start, &total) < 0)
        return NULL;
    if (total - start > MAX_BATCH) {
        PyErr_SetString(PyExc_ValueError, "send: ids and queries differ in length, or start is out of range");
        return NULL;
    }
    PyObject *ids = args[1], *queries = args[2];
    int count = (int)(total - start);
    struct mmsghdr headers[MAX_BATCH];
    struct iovec parts[MAX_BATCH][2];
    uint8_t id_bytes[MAX_BATCH][2];
    memset(headers, 0, sizeof(headers[0]) * (size_t)count);
    for (int i = 0; i < count; i++) {
        PyObject *query = PyList_GET_ITEM(queries, start + i), *id = PyList_GET_ITEM(ids, start + i);
        if (!PyBytes_CheckExact(query) || PyBytes_GET_SIZE(query) < 2) {
            PyErr_SetString(PyExc_ValueError, "send: a query is not bytes of at least 2");
            return NULL;
        }
        long value = PyLong_AsLong(id);
        if (value == -1 && PyErr_Occurred())
            return NULL;
        if (value < 0 || value > 0xFFFF) {
            PyErr_SetString(PyExc_ValueError, "send: an ID is not 16 bits");
            return NULL;
        }
        id_bytes[i][0] = (uint8_t)(value >> 8);
        id_bytes[i][1] = (uint8_t)value;
        parts[i][0].iov_base = id_bytes[i];
        parts[i][0].iov_len = 2;
        parts[i][1].iov_base = PyBytes_AS_STRING(query) + 2;
        parts[i][1].iov_len = (size_t)PyBytes_GET_SIZE(query) - 2;
        headers[i].msg_hdr.msg_iov = parts[i];
        headers[i].msg_hdr.msg_iovlen = 2;
    }
    return sent_count(sendmmsg(fd, headers, (unsigned)count, MSG_DONTWAIT));
}

/* The sender the kernel wrote, as socket.recvfrom gives it; NULL with an exception set. */
static PyObject *sender(const struct sockaddr_storage *name, socklen_t length) {
    char host[INET6_ADDRSTRLEN];
    if (name->ss_family == AF_INET && length >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)name;
        if (inet_ntop(AF_INET, &v4->sin_addr, host, sizeof(host)) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, (int)ntohs(v4->sin_port));
    }
    if (name->ss_family == AF_INET6 && length >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)name;
        if (inet_ntop(AF_INET6, &v6->sin6_addr, host, sizeof(host)) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(siII)", host, (int)ntohs(v6->sin6_port), (unsigned)ntohl(v6->sin6_flowinfo),
                             (unsigned)v6->sin6_scope_id);
    }
    PyErr_SetString(PyExc_OSError, "receive_from: a sender of an unknown address family");
    return NULL;
}

/* receive and receive_from: the datagrams waiting on fd (args: fd, count, size), each as
 * bytes or None, with its sender as a tuple (data, sender) when `senders`. */
static PyObject *receive_datagrams(PyObject *const *args, Py_ssize_t nargs, const char *name, int senders) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s(fd, count, size)", name);
        return NULL;
    }
    int fd = descriptor(args[0]);
    if (fd < 0)
        return NULL;
    long count = PyLong_AsLong(args[1]);
    if (count == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t size = PyLong_AsSsize_t(args[2]);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (count < 1 || count > MAX_BATCH || size < 1 || size > MAX_DATAGRAM) {
        PyErr_Format(PyExc_ValueError, "%s: count is 1..64, size 1..65536", name);
        return NULL;
    }
    /* A byte more than size: a longer datagram shows, however the kernel flags it. */
    if (grow(size + 1) < 0)
        return NULL;
    Py_ssize_t slot = in_slot;
    struct mmsghdr headers[MAX_BATCH];
    struct iovec parts[MAX_BATCH];
    struct sockaddr_storage names[MAX_BATCH];
    memset(headers, 0, sizeof(headers[0]) * (size_t)count);
    for (long i = 0; i < count; i++) {
        parts[i].iov_base = in_buffer + i * slot;
        parts[i].iov_len = (size_t)(size + 1);
        headers[i].msg_hdr.msg_iov = &parts[i];
        headers[i].msg_hdr.msg_iovlen = 1;
        if (senders) {
            headers[i].msg_hdr.msg_name = &names[i];
            headers[i].msg_hdr.msg_namelen = sizeof(names[i]);
        }
    }
    int got = recvmmsg(fd, headers, (unsigned)count, MSG_DONTWAIT, NULL);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return PyList_New(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = PyList_New(got);
    if (out == NULL)
        return NULL;
    for (int i = 0; i < got; i++) {
        size_t length = headers[i].msg_len;
        PyObject *item;
        if ((headers[i].msg_hdr.msg_flags & MSG_TRUNC) || length > (size_t)size)
            item = Py_NewRef(Py_None);
        else
            item = PyBytes_FromStringAndSize((const char *)parts[i].iov_base, (Py_ssize_t)length);
        if (senders && item != NULL) {
            PyObject *data = item, *from = sender(&names[i], headers[i].msg_hdr.msg_namelen);
            item = from == NULL ? NULL : PyTuple_Pack(2, data, from);
            Py_XDECREF(from);
            Py_DECREF(data);
        }
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

PyDoc_STRVAR(receive_doc,
"receive(fd, count, size) -> list[bytes | None]\n\n"
"The datagrams waiting on fd, at most count (1..64): each as bytes, or None\n"
"for one longer than size (1..65536); [] if none wait. OSError for an error\n"
"the socket reports (e.g. ConnectionRefusedError after port unreachable).");

static PyObject *burst_receive(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return receive_datagrams(args, nargs, "receive", 0);
}

PyDoc_STRVAR(send_to_doc,
"send_to(fd, replies, addresses, start) -> int\n\n"
"Send replies[start:] (at most 64 of them) on the unconnected socket fd, each to\n"
"the address of the same index in addresses, as socket.sendto takes it:\n"
"(host, port) or, for IPv6, (host, port, flowinfo, scope_id), host a literal\n"
"address. The number sent, at least 1; OSError if not even the first could be\n"
"sent, ValueError if its address is not one.");

/* addr as socket.sendto takes it, written to *out; its length, or -1 with an exception set. */
static socklen_t socket_address(PyObject *addr, struct sockaddr_storage *out) {
    Py_ssize_t fields = PyTuple_Check(addr) ? PyTuple_GET_SIZE(addr) : 0;
    if (fields != 2 && fields != 4) {
        PyErr_SetString(PyExc_ValueError, "send_to: an address is not (host, port[, flowinfo, scope_id])");
        return (socklen_t)-1;
    }
    const char *host = PyUnicode_Check(PyTuple_GET_ITEM(addr, 0)) ? PyUnicode_AsUTF8(PyTuple_GET_ITEM(addr, 0)) : NULL;
    if (host == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "send_to: a host is not a string");
        return (socklen_t)-1;
    }
    long port = PyLong_AsLong(PyTuple_GET_ITEM(addr, 1));
    if (port == -1 && PyErr_Occurred())
        return (socklen_t)-1;
    if (port < 0 || port > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "send_to: a port is not 16 bits");
        return (socklen_t)-1;
    }
    memset(out, 0, sizeof(*out));
    if (fields == 2 && strchr(host, ':') == NULL) {
        struct sockaddr_in *v4 = (struct sockaddr_in *)out;
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &v4->sin_addr) == 1)
            return sizeof(*v4);
    } else {
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)out;
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        if (fields == 4) {
            unsigned long flowinfo = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(addr, 2));
            unsigned long scope = flowinfo == (unsigned long)-1 ? 0 : PyLong_AsUnsignedLong(PyTuple_GET_ITEM(addr, 3));
            if (PyErr_Occurred())
                return (socklen_t)-1;
            if (flowinfo > 0xFFFFFu || scope > UINT32_MAX) {
                PyErr_SetString(PyExc_ValueError, "send_to: flowinfo or scope_id out of range");
                return (socklen_t)-1;
            }
            v6->sin6_flowinfo = htonl((uint32_t)flowinfo);
            v6->sin6_scope_id = (uint32_t)scope;
        }
        if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1)
            return sizeof(*v6);
    }
    PyErr_SetString(PyExc_ValueError, "send_to: a host is not a literal address");
    return (socklen_t)-1;
}

static PyObject *burst_send_to(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int fd;
    Py_ssize_t start, total;
    if (sending_args(args, nargs, "send_to", "replies", "addresses", &fd, &start, &total) < 0)
        return NULL;
    PyObject *replies = args[1], *addresses = args[2];
    int count = (int)(total - start > MAX_BATCH ? MAX_BATCH : total - start);
    struct mmsghdr headers[MAX_BATCH];
    struct iovec parts[MAX_BATCH];
    struct sockaddr_storage names[MAX_BATCH];
    memset(headers, 0, sizeof(headers[0]) * (size_t)count);
    for (int i = 0; i < count; i++) {
        PyObject *reply = PyList_GET_ITEM(replies, start + i);
        if (!PyBytes_CheckExact(reply)) {
            PyErr_SetString(PyExc_TypeError, "send_to: a reply is not bytes");
            return NULL;
        }
        socklen_t length = socket_address(PyList_GET_ITEM(addresses, start + i), &names[i]);
        if (length == (socklen_t)-1) {
            if (i == 0)
                return NULL;
            PyErr_Clear(); /* those before it go now; the next call, from it, raises */
            count = i;
            break;
        }
        parts[i].iov_base = PyBytes_AS_STRING(reply);
        parts[i].iov_len = (size_t)PyBytes_GET_SIZE(reply);
        headers[i].msg_hdr.msg_name = &names[i];
        headers[i].msg_hdr.msg_namelen = length;
        headers[i].msg_hdr.msg_iov = &parts[i];
        headers[i].msg_hdr.msg_iovlen = 1;
    }
    return sent_count(sendmmsg(fd, headers, (unsigned)count, MSG_DONTWAIT));
}

PyDoc_STRVAR(receive_from_doc,
"receive_from(fd, count, size) -> list[tuple[bytes | None, tuple]]\n\n"
"The datagrams waiting on the unconnected socket fd, at most count (1..64), each\n"
"with its sender as socket.recvfrom gives it: (host, port) or, for IPv6, (host,\n"
"port, flowinfo, scope_id); a datagram longer than size (1..65536) as None. []\n"
"if none wait; OSError for an error the socket reports.");

static PyObject *burst_receive_from(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return receive_datagrams(args, nargs, "receive_from", 1);
}

static PyMethodDef methods[] = {
    {"send", (PyCFunction)(void (*)(void))burst_send, METH_FASTCALL, send_doc},
    {"receive", (PyCFunction)(void (*)(void))burst_receive, METH_FASTCALL, receive_doc},
    {"send_to", (PyCFunction)(void (*)(void))burst_send_to, METH_FASTCALL, send_to_doc},
    {"receive_from", (PyCFunction)(void (*)(void))burst_receive_from, METH_FASTCALL, receive_from_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "meshsup.actors.dns.burst", "Upstream UDP bursts, and replies to clients, in one system call: see burst.c.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_burst(void) { return PyModule_Create(&module); }
