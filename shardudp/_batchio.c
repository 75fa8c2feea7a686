/*
 * shardudp._batchio: the C half of the "c" datapath (see shardudp/port.py).
 *
 * One Engine per adopted UDP socket. Engine.read() pulls datagrams with
 * recvmmsg into preallocated buffers and hands each to the protocol's
 * datagramReceived. Engine.write() is installed as the port's transport.write:
 * during a batch it queues the datagram (holding a reference, no copy) and the
 * queue goes out in one sendmmsg at the end of the batch, or when it fills.
 *
 * What stays in Python (the port), because it is rare and must match stock
 * Twisted exactly: the first write to each destination (address checks and a
 * synchronous send that raises like Twisted), handler-exception accounting and
 * logging, connectionRefused, and logging of send errors that surface only
 * when a queued batch is flushed.
 *
 * Every socket call uses MSG_DONTWAIT: O_NONBLOCK is shared with other
 * processes holding the same open file description.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Direct-mapped cache of source address -> (host, port) tuple. A collision
 * just rebuilds the tuple; the size bounds memory whatever the client count. */
#define RX_CACHE_SIZE 1024
/* Bounded retries on EINTR, so a signal storm cannot pin the loop. */
#define EINTR_RETRIES 8

typedef union {
    struct sockaddr sa;
    struct sockaddr_in in4;
    struct sockaddr_in6 in6;
} addr_t;

typedef struct {
    addr_t addr;
    socklen_t len;
    PyObject *tuple; /* owned; NULL when empty */
} rx_entry;

typedef struct {
    PyObject_HEAD
    int fd;
    int owns_fd; /* fd is our dup (tp_new leaves 0 here, which is not ours) */
    int family;
    int closed;
    int close_pending;
    int in_batch;
    int connected;
    Py_ssize_t maxsize;
    Py_ssize_t max_payload;
    int batch;     /* capacity: datagrams per recvmmsg and per sendmmsg */
    int adaptive;  /* datagrams the next recvmmsg asks for (1..batch) */
    unsigned long sample_mask;
    Py_ssize_t cache_cap;

    PyObject *port;     /* the ShardPort: slow paths and error reporting */
    PyObject *protocol;
    PyObject *stats;    /* ListenerStats or NULL */
    PyObject *txcache;  /* dict: addr tuple -> bytes holding an addr_t */

    /* receive side */
    char *rbuf;
    struct mmsghdr *rmsg;
    struct iovec *riov;
    addr_t *rname;
    rx_entry *rxcache;
    PyObject *cur_tuple; /* borrowed: the sender of the datagram being delivered */
    addr_t *cur_addr;
    socklen_t cur_len;

    /* send queue */
    struct mmsghdr *smsg;
    struct iovec *siov;
    addr_t *sname;
    PyObject **sdata;
    int *serr; /* errno of each failed message of one flush */
    int squeued;

    /* counters not yet added to stats */
    unsigned long long rx_dgrams, rx_bytes, tx_dgrams, tx_bytes, tx_errors, truncated;
    unsigned long long rx_seq;
    Py_ssize_t truncated_max; /* the longest truncated datagram since the last push */

    /* The in-flight record (shardudp.inflight), shared with the master: the
     * sender of the datagram being handled, so a worker that dies in its
     * handler names the source that killed it. */
    Py_buffer rec_view;
    char *rec;
    uint32_t rec_state; /* the listener's number + 1 */

    /* Session keeping (shardudp.gate): sender -> monotonic time last heard,
     * and what to call when it holds more than flows_cap senders. */
    PyObject *flows;
    PyObject *evict;
    Py_ssize_t flows_cap;
} Engine;

static PyObject *s_datagramReceived, *s_handler_failed, *s_slow_write, *s_refused,
    *s_async_send_failed, *s_send_failed, *s_observe_ns, *s_rx_datagrams, *s_rx_bytes,
    *s_tx_datagrams, *s_tx_bytes, *s_tx_errors, *s_truncated, *s_truncated_max;

#define REC_ADDR_AT 8
#define REC_ADDR_MAX 28

/* ---- small helpers ---------------------------------------------------- */

/* The pending exception as one object (3.12 has this built in). */
static PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v != NULL && tb != NULL)
        PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
#endif
}

static void
restore_exception(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    if (exc != NULL)
        PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

static int
add_to_attr(PyObject *obj, PyObject *name, unsigned long long delta)
{
    if (delta == 0)
        return 0;
    PyObject *cur = PyObject_GetAttr(obj, name);
    if (cur == NULL)
        return -1;
    PyObject *d = PyLong_FromUnsignedLongLong(delta);
    if (d == NULL) {
        Py_DECREF(cur);
        return -1;
    }
    PyObject *sum = PyNumber_Add(cur, d);
    Py_DECREF(cur);
    Py_DECREF(d);
    if (sum == NULL)
        return -1;
    int r = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return r;
}

/* Add pending counter deltas to the ListenerStats. Never raises: a broken
 * stats object must not take the data path down with it. */
static void
push_stats(Engine *e)
{
    if (e->stats == NULL)
        return;
    PyObject *pending = take_exception();
    if (add_to_attr(e->stats, s_rx_datagrams, e->rx_dgrams) < 0 ||
        add_to_attr(e->stats, s_rx_bytes, e->rx_bytes) < 0 ||
        add_to_attr(e->stats, s_tx_datagrams, e->tx_dgrams) < 0 ||
        add_to_attr(e->stats, s_tx_bytes, e->tx_bytes) < 0 ||
        add_to_attr(e->stats, s_tx_errors, e->tx_errors) < 0 ||
        add_to_attr(e->stats, s_truncated, e->truncated) < 0)
        PyErr_WriteUnraisable(e->stats);
    if (e->truncated_max > 0) {
        PyObject *cur = PyObject_GetAttr(e->stats, s_truncated_max);
        Py_ssize_t was = cur ? PyLong_AsSsize_t(cur) : -1;
        Py_XDECREF(cur);
        if (PyErr_Occurred())
            PyErr_WriteUnraisable(e->stats);
        else if (was < e->truncated_max) {
            PyObject *v = PyLong_FromSsize_t(e->truncated_max);
            if (v == NULL || PyObject_SetAttr(e->stats, s_truncated_max, v) < 0)
                PyErr_WriteUnraisable(e->stats);
            Py_XDECREF(v);
        }
    }
    e->rx_dgrams = e->rx_bytes = e->tx_dgrams = e->tx_bytes = e->tx_errors = e->truncated = 0;
    e->truncated_max = 0;
    restore_exception(pending);
}

/* Call port.<name>(*args); on failure report it as unraisable. */
static void
call_port(Engine *e, PyObject *name, PyObject *arg)
{
    if (e->port == NULL)
        return;
    PyObject *r = arg ? PyObject_CallMethodOneArg(e->port, name, arg)
                      : PyObject_CallMethodNoArgs(e->port, name);
    if (r == NULL)
        PyErr_WriteUnraisable(e->port);
    else
        Py_DECREF(r);
}

/* The current exception came from the protocol: let the port count and log it. */
static void
handler_failed(Engine *e)
{
    PyObject *exc = take_exception();
    if (exc != NULL)
        call_port(e, s_handler_failed, exc);
    Py_XDECREF(exc);
}

static PyObject *
oserror(int err)
{
    return PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
}

/* ---- addresses ---------------------------------------------------------- */

static unsigned
addr_hash(const addr_t *a)
{
    uint32_t h;
    if (a->sa.sa_family == AF_INET) {
        h = a->in4.sin_addr.s_addr * 0x9E3779B1u;
        h ^= (uint32_t)a->in4.sin_port * 0x85EBCA77u;
    } else {
        uint32_t w[4];
        memcpy(w, &a->in6.sin6_addr, 16);
        h = (w[0] ^ w[1] * 31u ^ w[2] * 961u ^ w[3]) * 0x9E3779B1u;
        h ^= (uint32_t)a->in6.sin6_port * 0x85EBCA77u;
    }
    return (h ^ (h >> 15)) & (RX_CACHE_SIZE - 1);
}

static int
addr_equal(const addr_t *a, socklen_t alen, const addr_t *b, socklen_t blen)
{
    if (alen != blen || a->sa.sa_family != b->sa.sa_family)
        return 0;
    if (a->sa.sa_family == AF_INET)
        return a->in4.sin_port == b->in4.sin_port &&
               a->in4.sin_addr.s_addr == b->in4.sin_addr.s_addr;
    return a->in6.sin6_port == b->in6.sin6_port &&
           memcmp(&a->in6.sin6_addr, &b->in6.sin6_addr, 16) == 0 &&
           a->in6.sin6_scope_id == b->in6.sin6_scope_id;
}

/* (host, port) for a source address, as Python's recvfrom gives it (IPv6
 * reduced to a 2-tuple, as Twisted does). New reference. */
static PyObject *
addr_tuple(Engine *e, const addr_t *a, socklen_t len)
{
    rx_entry *ent = &e->rxcache[addr_hash(a)];
    if (ent->tuple != NULL && addr_equal(&ent->addr, ent->len, a, len)) {
        Py_INCREF(ent->tuple);
        return ent->tuple;
    }
    char host[INET6_ADDRSTRLEN];
    unsigned port;
    if (a->sa.sa_family == AF_INET) {
        inet_ntop(AF_INET, &a->in4.sin_addr, host, sizeof host);
        port = ntohs(a->in4.sin_port);
    } else if (a->sa.sa_family == AF_INET6) {
        inet_ntop(AF_INET6, &a->in6.sin6_addr, host, sizeof host);
        port = ntohs(a->in6.sin6_port);
    } else {
        /* Not a UDP/IP source (should not happen): no address, like Python. */
        Py_RETURN_NONE;
    }
    PyObject *t = Py_BuildValue("(sI)", host, port);
    if (t == NULL)
        return NULL;
    Py_XSETREF(ent->tuple, Py_NewRef(t));
    memcpy(&ent->addr, a, len);
    ent->len = len;
    return t;
}

/* Fill *out from a ("host", port) tuple if it is a plain literal of our
 * family; return 0 if the address cannot be cached (a scoped IPv6 address,
 * "<broadcast>", a 4-tuple...), leaving those to the Python path. */
static int
tuple_to_addr(Engine *e, PyObject *addr, addr_t *out, socklen_t *len)
{
    if (!PyTuple_CheckExact(addr) || PyTuple_GET_SIZE(addr) != 2)
        return 0;
    PyObject *host = PyTuple_GET_ITEM(addr, 0), *port = PyTuple_GET_ITEM(addr, 1);
    if (!PyUnicode_CheckExact(host) || !PyLong_CheckExact(port))
        return 0;
    const char *h = PyUnicode_AsUTF8(host);
    if (h == NULL) {
        PyErr_Clear();
        return 0;
    }
    long p = PyLong_AsLong(port);
    if (p < 0 || p > 65535) {
        PyErr_Clear();
        return 0;
    }
    memset(out, 0, sizeof *out);
    if (e->family == AF_INET) {
        if (inet_pton(AF_INET, h, &out->in4.sin_addr) != 1)
            return 0;
        out->in4.sin_family = AF_INET;
        out->in4.sin_port = htons((uint16_t)p);
        *len = sizeof out->in4;
    } else {
        if (inet_pton(AF_INET6, h, &out->in6.sin6_addr) != 1)
            return 0;
        out->in6.sin6_family = AF_INET6;
        out->in6.sin6_port = htons((uint16_t)p);
        *len = sizeof out->in6;
    }
    return 1;
}

/* ---- sending ------------------------------------------------------------ */

/* A send failed after write() returned: count it, tell the protocol about a
 * refusal on a connected socket, log anything else. Never raises. */
static void
async_send_error(Engine *e, int err)
{
    e->tx_errors++;
    if (err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS)
        return; /* a full buffer: UDP drops, silently */
    if (err == ECONNREFUSED) {
        if (e->connected)
            call_port(e, s_refused, NULL);
        return;
    }
    PyObject *exc = oserror(err);
    if (exc == NULL) {
        PyErr_WriteUnraisable(e->port);
        return;
    }
    call_port(e, s_async_send_failed, exc);
    Py_DECREF(exc);
}

/* Send everything queued in as few sendmmsg calls as errors allow.
 *
 * No Python runs while the queue is live: errors are collected first and
 * reported only after the queue is reset, because a callback
 * (connectionRefused, a logger) may write(), which enqueues or flushes again. */
static void
flush(Engine *e)
{
    int q = e->squeued, i = 0, retries = 0, nerr = 0;
    int *errs = e->serr;
    while (i < q && e->fd >= 0) {
        int r = sendmmsg(e->fd, e->smsg + i, (unsigned)(q - i), MSG_DONTWAIT);
        if (r > 0) {
            for (int k = i; k < i + r; k++) {
                e->tx_dgrams++;
                e->tx_bytes += e->siov[k].iov_len;
            }
            i += r;
            continue;
        }
        int err = errno;
        if (err == EINTR && retries++ < EINTR_RETRIES)
            continue;
        if (err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS) {
            /* The buffer is full: the rest would fail the same way. */
            e->tx_errors += (unsigned long long)(q - i);
            break;
        }
        /* Message i failed on its own (sendmmsg reports the first failure). */
        errs[nerr++] = err;
        i++;
    }
    for (int k = 0; k < q; k++)
        Py_CLEAR(e->sdata[k]);
    e->squeued = 0;
    if (nerr == 0)
        return;
    /* A nested flush (a callback writing a full queue) reuses e->serr. */
    int local[nerr];
    memcpy(local, errs, sizeof(int) * (size_t)nerr);
    for (int k = 0; k < nerr; k++)
        async_send_error(e, local[k]);
}

static void
enqueue(Engine *e, PyObject *data, const addr_t *a, socklen_t alen)
{
    /* A flush may run Python (error reporting) that writes, and so refills
     * the queue: check again after every flush, and give up on this datagram,
     * as a full socket buffer would, if something keeps refilling it. */
    for (int tries = 0; e->squeued >= e->batch; tries++) {
        if (tries == EINTR_RETRIES) {
            e->tx_errors++;
            return;
        }
        flush(e);
    }
    int k = e->squeued++;
    e->sdata[k] = Py_NewRef(data);
    e->siov[k].iov_base = PyBytes_AS_STRING(data);
    e->siov[k].iov_len = (size_t)PyBytes_GET_SIZE(data);
    struct msghdr *h = &e->smsg[k].msg_hdr;
    if (a != NULL) {
        memcpy(&e->sname[k], a, alen);
        h->msg_name = &e->sname[k];
        h->msg_namelen = alen;
    } else {
        h->msg_name = NULL;
        h->msg_namelen = 0;
    }
}

/* Outside a batch: send now. Errors other than a full buffer go to the
 * port's stock-Twisted mapping, which may raise into the caller. */
static PyObject *
send_now(Engine *e, PyObject *data, const addr_t *a, socklen_t alen, PyObject *addr)
{
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    ssize_t r;
    int retries = 0;
    do {
        r = a ? sendto(e->fd, PyBytes_AS_STRING(data), (size_t)n, MSG_DONTWAIT, &a->sa, alen)
              : send(e->fd, PyBytes_AS_STRING(data), (size_t)n, MSG_DONTWAIT);
    } while (r < 0 && errno == EINTR && retries++ < EINTR_RETRIES);
    if (r >= 0) {
        if (e->stats) {
            e->tx_dgrams++;
            e->tx_bytes += (unsigned long long)n;
            push_stats(e);
        }
        Py_RETURN_NONE;
    }
    int err = errno;
    PyObject *exc = oserror(err);
    if (exc == NULL)
        return NULL;
    /* _send_failed counts tx_errors itself. */
    PyObject *res = PyObject_CallMethodObjArgs(e->port, s_send_failed, exc, data,
                                               addr ? addr : Py_None, NULL);
    Py_DECREF(exc);
    if (res == NULL)
        return NULL;
    Py_DECREF(res);
    Py_RETURN_NONE;
}

static int
check_open(Engine *e)
{
    if (e->closed || !e->owns_fd || e->fd < 0) {
        PyErr_SetString(PyExc_OSError, "the port is closed");
        return -1;
    }
    return 0;
}

/* The rare and the first-time cases: Python does exactly what stock Twisted
 * does (and raises what it raises); then remember the address if we can. */
static PyObject *
slow_write(Engine *e, PyObject *data, PyObject *addr)
{
    if (e->squeued)
        flush(e); /* keep datagrams to one destination in order */
    PyObject *r = PyObject_CallMethodObjArgs(e->port, s_slow_write, data, addr, NULL);
    if (r == NULL)
        return NULL;
    int cacheable = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (cacheable > 0 && !e->connected && addr != Py_None) {
        addr_t a;
        socklen_t alen;
        if (tuple_to_addr(e, addr, &a, &alen)) {
            if (PyDict_GET_SIZE(e->txcache) >= e->cache_cap)
                PyDict_Clear(e->txcache);
            PyObject *v = PyBytes_FromStringAndSize((const char *)&a, alen);
            if (v == NULL || PyDict_SetItem(e->txcache, addr, v) < 0)
                PyErr_Clear(); /* only a cache: the datagram was sent */
            Py_XDECREF(v);
        }
    }
    Py_RETURN_NONE;
}

static PyObject *
Engine_write(Engine *e, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *data = NULL, *addr = Py_None;
    if (nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "write() takes a datagram and an optional addr");
        return NULL;
    }
    if (nargs >= 1)
        data = args[0];
    if (nargs == 2)
        addr = args[1];
    if (kwnames != NULL) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
            PyObject *k = PyTuple_GET_ITEM(kwnames, i), *v = args[nargs + i];
            if (PyUnicode_CompareWithASCIIString(k, "addr") == 0 && nargs < 2)
                addr = v;
            else if (PyUnicode_CompareWithASCIIString(k, "datagram") == 0 && nargs < 1)
                data = v;
            else {
                PyErr_Format(PyExc_TypeError, "write() got an unexpected argument %R", k);
                return NULL;
            }
        }
    }
    if (data == NULL) {
        PyErr_SetString(PyExc_TypeError, "write() missing the datagram");
        return NULL;
    }
    if (check_open(e) < 0)
        return NULL;
    if (!PyBytes_CheckExact(data) || PyBytes_GET_SIZE(data) > e->max_payload)
        return slow_write(e, data, addr); /* odd types, EMSGSIZE: as stock */

    const addr_t *a;
    addr_t cached;
    socklen_t alen;
    if (e->connected) {
        if (addr != Py_None)
            return slow_write(e, data, addr); /* stock's address check */
        /* Never queued: a refusal belongs to the write that met it, and
         * sendmmsg hides the errors of all but the first failing message. */
        return send_now(e, data, NULL, 0, addr);
    } else if (addr == e->cur_tuple && addr != NULL) {
        /* A reply to the sender being delivered: the kernel gave us this
         * address, so it needs no checking. */
        a = e->cur_addr;
        alen = e->cur_len;
    } else {
        PyObject *v = PyDict_GetItemWithError(e->txcache, addr);
        if (v == NULL) {
            PyErr_Clear(); /* unhashable: Python will say what is wrong */
            return slow_write(e, data, addr);
        }
        /* Copied: a flush inside enqueue() may run Python that clears the
         * cache and frees v. */
        alen = (socklen_t)PyBytes_GET_SIZE(v);
        memcpy(&cached, PyBytes_AS_STRING(v), (size_t)alen);
        a = &cached;
    }
    if (e->in_batch) {
        enqueue(e, data, a, alen);
        Py_RETURN_NONE;
    }
    return send_now(e, data, a, alen, addr);
}

/* ---- receiving ---------------------------------------------------------- */

static inline long long
now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t); /* what time.perf_counter_ns reads */
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void
observe(Engine *e, long long ns)
{
    PyObject *v = PyLong_FromLongLong(ns);
    PyObject *r = v ? PyObject_CallMethodOneArg(e->stats, s_observe_ns, v) : NULL;
    Py_XDECREF(v);
    if (r == NULL)
        PyErr_WriteUnraisable(e->stats);
    else
        Py_DECREF(r);
}

/* Size the next read so that delivering one batch takes about BATCH_TARGET_NS.
 * A batch is read before any of it is handled, and its replies go out at its
 * end: with a slow handler a full batch would hold replies back for the whole
 * batch and, if the worker dies, lose every datagram it had read. Fast
 * handlers keep the full batch, slow ones read one datagram at a time. */
#define BATCH_TARGET_NS 1000000LL

static void
adapt_batch(Engine *e, int n, long long elapsed_ns)
{
    if (n <= 0)
        return;
    long long per = elapsed_ns / n;
    long long want = per > 0 ? BATCH_TARGET_NS / per : e->batch;
    if (want < 1)
        want = 1;
    e->adaptive = want > e->batch ? e->batch : (int)want;
}

static void engine_release(Engine *e);

static PyObject *
Engine_read(Engine *e, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "read(max_count, max_bytes)");
        return NULL;
    }
    long long max_count = PyLong_AsLongLong(args[0]);
    long long max_bytes = PyLong_AsLongLong(args[1]);
    if ((max_count == -1 || max_bytes == -1) && PyErr_Occurred())
        return NULL;
    if (e->in_batch) {
        PyErr_SetString(PyExc_RuntimeError,
                        "drain() called from inside datagramReceived of the same port");
        return NULL;
    }
    if (check_open(e) < 0)
        return NULL;
    PyObject *cb = PyObject_GetAttr(e->protocol, s_datagramReceived);
    if (cb == NULL)
        return NULL;

    long long total = 0, nbytes = 0;
    int retries = 0, failed = 0;
    while (total < max_count && nbytes < max_bytes && !e->close_pending) {
        unsigned want =
            (unsigned)(max_count - total < e->adaptive ? max_count - total : e->adaptive);
        for (unsigned i = 0; i < want; i++)
            e->rmsg[i].msg_hdr.msg_namelen = sizeof(addr_t);
        /* MSG_TRUNC: msg_len is then the datagram's real length, so a
         * truncated one is counted with the size that would have fitted. */
        int n = recvmmsg(e->fd, e->rmsg, want, MSG_DONTWAIT | MSG_TRUNC, NULL);
        if (n < 0) {
            int err = errno;
            if (err == EINTR && retries++ < EINTR_RETRIES)
                continue;
            if (err == EAGAIN || err == EWOULDBLOCK)
                break;
            if (err == ECONNREFUSED) {
                if (e->connected)
                    call_port(e, s_refused, NULL);
                break;
            }
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            failed = 1; /* as stock Twisted: the reactor drops the port */
            break;
        }
        e->in_batch = 1;
        long long batch_start = now_ns();
        /* One time for the whole batch: ~1 ms at most, far below session_idle. */
        PyObject *heard = e->flows ? PyFloat_FromDouble((double)batch_start / 1e9) : NULL;
        if (e->flows != NULL && heard == NULL)
            PyErr_Clear(); /* out of memory: this batch's senders are not tracked */
        for (int i = 0; i < n; i++) {
            Py_ssize_t len = (Py_ssize_t)e->rmsg[i].msg_len;
            if (len > e->maxsize) {
                e->truncated++;
                if (len > e->truncated_max)
                    e->truncated_max = len;
                len = e->maxsize;
            }
            PyObject *argv[2];
            argv[0] = PyBytes_FromStringAndSize(e->rbuf + (size_t)i * (size_t)e->maxsize, len);
            argv[1] = argv[0] ? addr_tuple(e, &e->rname[i], e->rmsg[i].msg_hdr.msg_namelen) : NULL;
            nbytes += len;
            if (argv[1] == NULL) {
                Py_XDECREF(argv[0]);
                handler_failed(e); /* out of memory: count it, keep going */
                continue;
            }
            /* flows may be dropped by set_flows from a handler, mid-batch */
            if (heard != NULL && e->flows != NULL && PyDict_SetItem(e->flows, argv[1], heard) < 0)
                PyErr_Clear(); /* out of memory: this sender is simply not tracked */
            e->cur_tuple = argv[1];
            e->cur_addr = &e->rname[i];
            e->cur_len = e->rmsg[i].msg_hdr.msg_namelen;
            if (e->rec != NULL) {
                socklen_t nl = e->cur_len < REC_ADDR_MAX ? e->cur_len : REC_ADDR_MAX;
                memcpy(e->rec + REC_ADDR_AT, &e->rname[i], nl);
                memcpy(e->rec, &e->rec_state, sizeof e->rec_state);
            }
            PyObject *r;
            if (e->stats != NULL) {
                e->rx_dgrams++;
                e->rx_bytes += (unsigned long long)len;
                if ((++e->rx_seq & e->sample_mask) == 0) {
                    long long t0 = now_ns();
                    r = PyObject_Vectorcall(cb, argv, 2, NULL);
                    if (r != NULL) /* as the Python path: failures are not timed */
                        observe(e, now_ns() - t0);
                } else {
                    r = PyObject_Vectorcall(cb, argv, 2, NULL);
                }
            } else {
                r = PyObject_Vectorcall(cb, argv, 2, NULL);
            }
            e->cur_tuple = NULL;
            if (e->rec != NULL)
                memset(e->rec, 0, sizeof e->rec_state);
            if (r == NULL)
                handler_failed(e);
            else
                Py_DECREF(r);
            Py_DECREF(argv[0]);
            Py_DECREF(argv[1]);
            if (e->close_pending)
                break;
        }
        e->in_batch = 0;
        if (heard != NULL) {
            Py_DECREF(heard);
            if (e->flows != NULL && PyDict_GET_SIZE(e->flows) > e->flows_cap && e->evict) {
                PyObject *r = PyObject_CallNoArgs(e->evict);
                if (r == NULL)
                    PyErr_WriteUnraisable(e->evict);
                Py_XDECREF(r);
            }
        }
        flush(e);
        adapt_batch(e, n, now_ns() - batch_start);
        total += n;
        if ((unsigned)n < want)
            break; /* the queue ran dry; epoll will tell us when there is more */
    }
    Py_DECREF(cb);
    push_stats(e);
    if (e->close_pending)
        engine_release(e);
    if (failed)
        return NULL;
    return PyLong_FromLongLong(total);
}

/* ---- lifecycle ---------------------------------------------------------- */

static PyObject *
Engine_set_connected(Engine *e, PyObject *addr)
{
    if (e->squeued)
        flush(e); /* queued before connect(): sent to their own addresses */
    e->connected = addr != Py_None;
    PyDict_Clear(e->txcache);
    Py_RETURN_NONE;
}

static PyObject *
Engine_set_protocol(Engine *e, PyObject *obj)
{
    /* Read again at every read(): takes effect from the next batch. */
    Py_SETREF(e->protocol, Py_NewRef(obj));
    Py_RETURN_NONE;
}

static PyObject *
Engine_set_flows(Engine *e, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "set_flows(dict or None, cap, evict)");
        return NULL;
    }
    if (args[0] != Py_None && !PyDict_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "set_flows: a dict or None");
        return NULL;
    }
    Py_ssize_t cap = PyLong_AsSsize_t(args[1]);
    if (cap == -1 && PyErr_Occurred())
        return NULL;
    Py_CLEAR(e->flows);
    Py_CLEAR(e->evict);
    if (args[0] != Py_None) {
        e->flows = Py_NewRef(args[0]);
        e->evict = Py_NewRef(args[2]);
        e->flows_cap = cap;
    }
    Py_RETURN_NONE;
}

static void
release_record(Engine *e)
{
    if (e->rec != NULL) {
        PyBuffer_Release(&e->rec_view);
        e->rec = NULL;
    }
}

static PyObject *
Engine_set_record(Engine *e, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_record(buffer or None, listener)");
        return NULL;
    }
    long index = PyLong_AsLong(args[1]);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    if (index < 0 || index > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "set_record: listener number out of range");
        return NULL;
    }
    release_record(e);
    if (args[0] == Py_None)
        Py_RETURN_NONE;
    if (PyObject_GetBuffer(args[0], &e->rec_view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (e->rec_view.len < REC_ADDR_AT + REC_ADDR_MAX) {
        PyBuffer_Release(&e->rec_view);
        PyErr_SetString(PyExc_ValueError, "set_record: buffer too small");
        return NULL;
    }
    e->rec = e->rec_view.buf;
    e->rec_state = (uint32_t)index + 1;
    Py_RETURN_NONE;
}

/* Drop every Python reference (breaking the port <-> engine cycle) and
 * close our own dup of the socket. */
static void
engine_release(Engine *e)
{
    if (e->squeued)
        flush(e);
    e->closed = 1;
    e->close_pending = 0;
    if (e->owns_fd && e->fd >= 0)
        close(e->fd);
    e->fd = -1;
    release_record(e);
    Py_CLEAR(e->port);
    Py_CLEAR(e->protocol);
    Py_CLEAR(e->stats);
    Py_CLEAR(e->flows);
    Py_CLEAR(e->evict);
    if (e->txcache)
        PyDict_Clear(e->txcache);
    if (e->rxcache)
        for (int i = 0; i < RX_CACHE_SIZE; i++)
            Py_CLEAR(e->rxcache[i].tuple);
}

static PyObject *
Engine_close(Engine *e, PyObject *Py_UNUSED(ignored))
{
    if (e->closed)
        Py_RETURN_NONE;
    if (e->squeued)
        flush(e); /* replies written before the close still go out */
    e->closed = 1;
    if (e->in_batch)
        e->close_pending = 1; /* buffers in use: release at the batch end */
    else
        engine_release(e);
    Py_RETURN_NONE;
}

static int
Engine_traverse(Engine *e, visitproc visit, void *arg)
{
    Py_VISIT(e->port);
    Py_VISIT(e->protocol);
    Py_VISIT(e->stats);
    Py_VISIT(e->flows);
    Py_VISIT(e->evict);
    Py_VISIT(e->txcache);
    for (int k = 0; k < e->squeued; k++)
        Py_VISIT(e->sdata[k]);
    return 0;
}

static int
Engine_clear(Engine *e)
{
    Py_CLEAR(e->port);
    Py_CLEAR(e->protocol);
    Py_CLEAR(e->stats);
    Py_CLEAR(e->flows);
    Py_CLEAR(e->evict);
    Py_CLEAR(e->txcache);
    for (int k = 0; k < e->squeued; k++)
        Py_CLEAR(e->sdata[k]);
    e->squeued = 0;
    return 0;
}

static void
Engine_dealloc(Engine *e)
{
    PyObject_GC_UnTrack(e);
    Engine_clear(e);
    release_record(e);
    if (e->owns_fd && e->fd >= 0)
        close(e->fd);
    if (e->rxcache)
        for (int i = 0; i < RX_CACHE_SIZE; i++)
            Py_CLEAR(e->rxcache[i].tuple);
    PyMem_Free(e->rbuf);
    PyMem_Free(e->rmsg);
    PyMem_Free(e->riov);
    PyMem_Free(e->rname);
    PyMem_Free(e->rxcache);
    PyMem_Free(e->smsg);
    PyMem_Free(e->siov);
    PyMem_Free(e->sname);
    PyMem_Free(e->sdata);
    PyMem_Free(e->serr);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static int
Engine_init(Engine *e, PyObject *args, PyObject *kwds)
{
    int fd, family, batch;
    PyObject *port, *protocol, *stats;
    Py_ssize_t maxsize, cache_cap;
    unsigned long sample_mask;
    static char *kwlist[] = {"fd",     "family", "port",        "protocol",  "stats",
                             "maxsize", "batch", "sample_mask", "cache_cap", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiOOOnikn", kwlist, &fd, &family, &port,
                                     &protocol, &stats, &maxsize, &batch, &sample_mask,
                                     &cache_cap))
        return -1;
    if (e->rbuf != NULL || e->owns_fd) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is already initialised");
        return -1;
    }
    if (fd < 0 || (family != AF_INET && family != AF_INET6) || maxsize < 1 ||
        maxsize > 65535 || batch < 1 || batch > 1024 || cache_cap < 1) {
        PyErr_SetString(PyExc_ValueError, "Engine: bad fd, family, maxsize, batch or cache_cap");
        return -1;
    }
    /* Our own descriptor: the port may close its socket (and the number be
     * reused) while a batch is still being delivered or flushed. */
    e->fd = dup(fd);
    if (e->fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    e->owns_fd = 1;
    e->family = family;
    e->maxsize = maxsize;
    e->max_payload = family == AF_INET ? 65507 : 65527;
    e->batch = batch;
    e->adaptive = 1; /* grows to batch after one read of a fast handler */
    e->sample_mask = sample_mask;
    e->cache_cap = cache_cap;
    e->port = Py_NewRef(port);
    e->protocol = Py_NewRef(protocol);
    e->stats = stats == Py_None ? NULL : Py_NewRef(stats);
    e->txcache = PyDict_New();
    e->rbuf = PyMem_Malloc((size_t)batch * (size_t)maxsize);
    e->rmsg = PyMem_Calloc((size_t)batch, sizeof(struct mmsghdr));
    e->riov = PyMem_Calloc((size_t)batch, sizeof(struct iovec));
    e->rname = PyMem_Calloc((size_t)batch, sizeof(addr_t));
    e->rxcache = PyMem_Calloc(RX_CACHE_SIZE, sizeof(rx_entry));
    e->smsg = PyMem_Calloc((size_t)batch, sizeof(struct mmsghdr));
    e->siov = PyMem_Calloc((size_t)batch, sizeof(struct iovec));
    e->sname = PyMem_Calloc((size_t)batch, sizeof(addr_t));
    e->sdata = PyMem_Calloc((size_t)batch, sizeof(PyObject *));
    e->serr = PyMem_Calloc((size_t)batch, sizeof(int));
    if (!e->txcache || !e->rbuf || !e->rmsg || !e->riov || !e->rname || !e->rxcache ||
        !e->smsg || !e->siov || !e->sname || !e->sdata || !e->serr) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < batch; i++) {
        e->riov[i].iov_base = e->rbuf + (size_t)i * (size_t)maxsize;
        e->riov[i].iov_len = (size_t)maxsize;
        e->rmsg[i].msg_hdr.msg_iov = &e->riov[i];
        e->rmsg[i].msg_hdr.msg_iovlen = 1;
        e->rmsg[i].msg_hdr.msg_name = &e->rname[i];
        e->smsg[i].msg_hdr.msg_iov = &e->siov[i];
        e->smsg[i].msg_hdr.msg_iovlen = 1;
    }
    return 0;
}

static PyMethodDef Engine_methods[] = {
    {"read", (PyCFunction)(void (*)(void))Engine_read, METH_FASTCALL,
     "read(max_count, max_bytes) -> int: receive and deliver up to the bounds"},
    {"write", (PyCFunction)(void (*)(void))Engine_write, METH_FASTCALL | METH_KEYWORDS,
     "write(datagram, addr=None): the transport's write"},
    {"set_connected", (PyCFunction)Engine_set_connected, METH_O,
     "set_connected(addr): the socket is now connected to addr"},
    {"close", (PyCFunction)Engine_close, METH_NOARGS,
     "close(): forget the fd and every Python reference"},
    {"set_protocol", (PyCFunction)Engine_set_protocol, METH_O,
     "set_protocol(obj): deliver to obj.datagramReceived from the next read on"},
    {"set_record", (PyCFunction)(void (*)(void))Engine_set_record, METH_FASTCALL,
     "set_record(buffer or None, listener): keep the in-flight record there"},
    {"set_flows", (PyCFunction)(void (*)(void))Engine_set_flows, METH_FASTCALL,
     "set_flows(dict or None, cap, evict): note when each sender was last heard"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shardudp._batchio.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "recvmmsg/sendmmsg data path of one adopted UDP socket",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_traverse = (traverseproc)Engine_traverse,
    .tp_clear = (inquiry)Engine_clear,
    .tp_methods = Engine_methods,
};

static struct PyModuleDef batchio_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shardudp._batchio",
    .m_doc = "recvmmsg/sendmmsg batches for shardudp's C datapath",
    .m_size = -1,
};

#define INTERN(var, text)                                                                    \
    do {                                                                                     \
        if ((var = PyUnicode_InternFromString(text)) == NULL)                                \
            return NULL;                                                                     \
    } while (0)

PyMODINIT_FUNC
PyInit__batchio(void)
{
    INTERN(s_datagramReceived, "datagramReceived");
    INTERN(s_handler_failed, "_handler_failed");
    INTERN(s_slow_write, "_slow_write");
    INTERN(s_refused, "_refused");
    INTERN(s_async_send_failed, "_async_send_failed");
    INTERN(s_send_failed, "_send_failed");
    INTERN(s_observe_ns, "observe_ns");
    INTERN(s_rx_datagrams, "rx_datagrams");
    INTERN(s_rx_bytes, "rx_bytes");
    INTERN(s_tx_datagrams, "tx_datagrams");
    INTERN(s_tx_bytes, "tx_bytes");
    INTERN(s_tx_errors, "tx_errors");
    INTERN(s_truncated, "truncated");
    INTERN(s_truncated_max, "truncated_max");
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&batchio_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
