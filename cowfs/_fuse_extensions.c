/*
 * cowfs's kernel-cache extensions: a few libfuse calls interposed under an unmodified pyfuse3.
 *
 * pyfuse3 3.5.0 gives Python no way to reply FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE to opendir
 * (its opendir handler takes a handle number only) nor to ask INIT for more capabilities. It
 * calls libfuse through dynamic symbols, though, and this library, loaded with RTLD_GLOBAL
 * before pyfuse3 is imported, comes first in the global scope, so pyfuse3's references bind
 * here (an unversioned definition satisfies a versioned reference). What is done:
 *
 *   - session creation: the operations table is copied and two entries wrapped, `init` (after
 *     pyfuse3's own, the capabilities cowfs asked for are added to `want`, where the kernel
 *     offers them) and `opendir` (the request is remembered); the entries pyfuse3 leaves
 *     empty (fallocate, lseek, copy_file_range, ioctl) are filled (the last section);
 *   - fuse_reply_open: a reply to a remembered opendir carries cache_readdir and keep_cache,
 *     so the kernel keeps the listing in the directory's page cache across opens; a file's
 *     carries noflush, as does fuse_reply_create's, when asked;
 *   - fuse_reply_err: a failed opendir is forgotten;
 *   - plain READDIR (the kernel sends it with READDIRPLUS_AUTO where no entry's attributes
 *     are wanted) goes to pyfuse3's readdirplus handler, and the entries it adds are written
 *     as plain ones (fuse_add_direntry_plus, fuse_reply_buf: the last section).
 *
 * Everything else goes to libfuse untouched (dlsym RTLD_NEXT: the library this one links).
 * Only libfuse's public, stable ABI is used (the operations table's leading members, the
 * fuse_file_info bits, fuse_conn_info.want/capable), compiled against the headers of the
 * machine it runs on. Counters tell the Python side (cowfs/fuse_extensions.py) what really
 * happened, so a mount can say the extensions are off instead of silently losing them.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 31
#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define EXPORTED __attribute__((visibility("default")))

/* Bumped when the control functions below change: the Python side refuses another value. */
#define EXTENSIONS_ABI 4

/* Opendir requests are answered in order, a few at a time: more than this many outstanding
 * means pyfuse3 dropped some without a reply, and the oldest are overwritten. A stale entry
 * can only mark a later open of a regular file, where the kernel ignores FOPEN_CACHE_DIR and
 * cowfs asks for keep_cache anyway. */
#define PENDING_OPENDIRS 64

enum counter {
    SESSIONS_WRAPPED,       /* sessions whose operations table this library wrapped */
    INIT_CALLS,             /* INIT requests seen through the wrapped table */
    PROTOCOL_MINOR,         /* the kernel's FUSE protocol minor version, from INIT */
    CAPABLE,                /* conn->capable at INIT */
    GRANTED,                /* the extra capabilities added to conn->want */
    OPENDIRS_SEEN,          /* opendir requests passed to pyfuse3 */
    CACHED_LISTING_REPLIES, /* opendir replies sent with cache_readdir and keep_cache */
    NOFLUSH_REPLIES,        /* open and create replies sent with noflush */
    EXTRA_REQUESTS,         /* fallocate, lseek, copy_file_range and ioctl requests seen */
    PLAIN_READDIRS,         /* plain READDIR requests served through pyfuse3's readdirplus */
    PASSTHROUGH_GRANTED,    /* 1: the session reads and writes backing files in the kernel */
    PASSTHROUGH_OPENS,      /* open and create replies that named a backing file */
    CONFLICTING_OPENS,      /* ... that could not: the inode passes through to another */
    BACKING_FILES_OPENED,   /* backing ids made */
    TMPFILE_ROUTED,         /* 1 where the table's tmpfile entry was filled (libfuse >= 3.17) */
    TMPFILE_REQUESTS,       /* TMPFILE requests passed to pyfuse3's create handler */
    KILL_REQUESTS,          /* write, setattr and open requests that asked to kill suid/sgid */
    COUNTERS
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long long counters[COUNTERS];
static int cache_listings;
static unsigned int wanted_capabilities;
static fuse_req_t pending[PENDING_OPENDIRS];
static unsigned int next_pending;

static struct fuse_lowlevel_ops wrapped_operations;
static void (*pyfuse3_init)(void *userdata, struct fuse_conn_info *conn);
static void (*pyfuse3_opendir)(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);

static void *next_symbol(const char *name)
{
    return dlsym(RTLD_NEXT, name);
}

/* The leading part of the operations table every libfuse 3 header has (up to lseek, 3.8), and
 * of struct fuse_file_info before 3.17 grew it (backing_id and padding). A caller built
 * against older headers than this library (pyfuse3 against 3.14, this against 3.17: the
 * opt-in test of scripts/libfuse-3.17.sh) passes the shorter ones. */
#define OPERATIONS_SIZE_MIN (offsetof(struct fuse_lowlevel_ops, lseek) + sizeof(void *))
/* Where the members of a fuse_file_info before 3.17 end (poll_events): its 4 bytes of tail
 * padding, which the caller may leave unset, are where 3.17 put backing_id. */
#define FILE_INFO_SIZE_BEFORE_3_17 36

/* The size of the fuse_file_info structs the caller passes: copied so much and no more, so
 * the tail of a shorter struct never reads as flags of a newer one (3.17's backing_id would
 * turn on passthrough). */
static size_t caller_file_info_size = sizeof(struct fuse_file_info);

/* *from* as the caller built it, in a struct of this library's headers. */
static void copy_file_info(struct fuse_file_info *to, const struct fuse_file_info *from)
{
    memset(to, 0, sizeof(*to));
    memcpy(to, from, caller_file_info_size);
}

static void remember_opendir(fuse_req_t req)
{
    pthread_mutex_lock(&lock);
    pending[next_pending] = req;
    next_pending = (next_pending + 1) % PENDING_OPENDIRS;
    counters[OPENDIRS_SEEN]++;
    pthread_mutex_unlock(&lock);
}

/* Whether *req* was a remembered opendir; it is forgotten either way (one reply per request). */
static int forget_opendir(fuse_req_t req)
{
    int found = 0;
    pthread_mutex_lock(&lock);
    for (unsigned int i = 0; i < PENDING_OPENDIRS; i++) {
        if (pending[i] == req) {
            pending[i] = NULL;
            found = 1;
        }
    }
    pthread_mutex_unlock(&lock);
    return found;
}

static void fill_passthrough(struct fuse_lowlevel_ops *table);
static void grant_passthrough(struct fuse_conn_info *conn);
static const struct fuse_file_info *with_backing(fuse_req_t req,
                                                 const struct fuse_file_info *fi);
static unsigned int killpriv_capability(struct fuse_conn_info *conn);
static int passthrough_granted;     /* the session reads and writes backing files */

static void wrapped_init(void *userdata, struct fuse_conn_info *conn)
{
    if (pyfuse3_init)
        pyfuse3_init(userdata, conn);
    /* After pyfuse3's own choices, so they cannot undo ours; libfuse >= 3.17 carries changes
     * made to the 32-bit `want` over into want_ext after this callback returns. */
    grant_passthrough(conn);
    unsigned int granted = wanted_capabilities & conn->capable;
    /* Not with passthrough: its writes never reach the daemon, which then could not kill
     * suid/sgid, and the kernel, trusting it to, would not either. */
    if (!passthrough_granted)
        granted |= killpriv_capability(conn);
    conn->want |= granted;
    pthread_mutex_lock(&lock);
    counters[INIT_CALLS]++;
    counters[PROTOCOL_MINOR] = conn->proto_minor;
    counters[CAPABLE] = conn->capable;
    counters[GRANTED] = granted;
    pthread_mutex_unlock(&lock);
}

static void wrapped_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (cache_listings)
        remember_opendir(req);
    pyfuse3_opendir(req, ino, fi);
}

static void fill_extra_operations(struct fuse_lowlevel_ops *table);
static void fill_plain_readdir(struct fuse_lowlevel_ops *table);
static void fill_tmpfile(struct fuse_lowlevel_ops *table);

/* The table libfuse will use: pyfuse3's, with init and opendir wrapped. A table too short
 * for the entries wrapped here, longer than this library knows, or a second session is
 * passed on unchanged. A wrapped table is passed whole (*op_size grows to this library's
 * size): libfuse copies no more than the size it is told, and entries past pyfuse3's table
 * (tmpfile) are filled here. */
static const struct fuse_lowlevel_ops *wrap_operations(const struct fuse_lowlevel_ops *op,
                                                       size_t *op_size_inout)
{
    size_t op_size = *op_size_inout;
    if (op == &wrapped_operations || op_size < OPERATIONS_SIZE_MIN
        || op_size > sizeof(wrapped_operations) || !op->opendir)
        return op;
    pthread_mutex_lock(&lock);
    int first = counters[SESSIONS_WRAPPED] == 0;
    if (first)
        counters[SESSIONS_WRAPPED] = 1;
    pthread_mutex_unlock(&lock);
    if (!first)
        return op;
    memset(&wrapped_operations, 0, sizeof(wrapped_operations));
    memcpy(&wrapped_operations, op, op_size);
    if (op_size < sizeof(wrapped_operations)
        && sizeof(struct fuse_file_info) > FILE_INFO_SIZE_BEFORE_3_17)
        caller_file_info_size = FILE_INFO_SIZE_BEFORE_3_17;
    pyfuse3_init = op->init;
    pyfuse3_opendir = op->opendir;
    wrapped_operations.init = wrapped_init;
    wrapped_operations.opendir = wrapped_opendir;
    fill_extra_operations(&wrapped_operations);
    fill_plain_readdir(&wrapped_operations);
    fill_passthrough(&wrapped_operations);
    fill_tmpfile(&wrapped_operations);
    *op_size_inout = sizeof(wrapped_operations);
    return &wrapped_operations;
}

/* Session creation under every name a libfuse 3 header may bind it to: fuse_session_new up to
 * 3.16; from 3.17 the header's inline fuse_session_new calls a versioned entry point (the
 * version struct is passed through untouched). Defined under other C names with asm labels,
 * so a header that declares fuse_session_new inline does not clash with this definition. */
typedef struct fuse_session *(*session_new_t)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                              size_t, void *);
typedef struct fuse_session *(*versioned_session_new_t)(struct fuse_args *,
                                                        const struct fuse_lowlevel_ops *,
                                                        size_t, void *, void *);

EXPORTED struct fuse_session *cowfs_session_new(struct fuse_args *args,
                                                const struct fuse_lowlevel_ops *op,
                                                size_t op_size, void *userdata)
    __asm__("fuse_session_new");
struct fuse_session *cowfs_session_new(struct fuse_args *args,
                                       const struct fuse_lowlevel_ops *op, size_t op_size,
                                       void *userdata)
{
    session_new_t real = (session_new_t)next_symbol("fuse_session_new");
    op = wrap_operations(op, &op_size);
    return real(args, op, op_size, userdata);
}

#define VERSIONED_SESSION_NEW(c_name, symbol)                                                  \
    EXPORTED struct fuse_session *c_name(struct fuse_args *args,                              \
                                         const struct fuse_lowlevel_ops *op, size_t op_size, \
                                         void *version, void *userdata) __asm__(symbol);     \
    struct fuse_session *c_name(struct fuse_args *args, const struct fuse_lowlevel_ops *op,   \
                                size_t op_size, void *version, void *userdata)               \
    {                                                                                          \
        versioned_session_new_t real = (versioned_session_new_t)next_symbol(symbol);          \
        op = wrap_operations(op, &op_size);                                                  \
        return real(args, op, op_size, version, userdata);                                   \
    }

VERSIONED_SESSION_NEW(cowfs_session_new_versioned, "fuse_session_new_versioned")
VERSIONED_SESSION_NEW(cowfs_session_new_317, "_fuse_session_new_317")
VERSIONED_SESSION_NEW(cowfs_session_new_underscore, "_fuse_session_new")

typedef int (*reply_open_t)(fuse_req_t, const struct fuse_file_info *);
static const struct fuse_file_info *without_flush(const struct fuse_file_info *fi);
typedef int (*reply_err_t)(fuse_req_t, int);
static void forget_plain_listing(fuse_req_t req);

EXPORTED int cowfs_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
    __asm__("fuse_reply_open");
int cowfs_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    static reply_open_t real;
    if (!real)
        real = (reply_open_t)next_symbol("fuse_reply_open");
    if (!forget_opendir(req)) {
        fi = without_flush(fi);
        const struct fuse_file_info *backed = with_backing(req, fi);
        return real(req, backed ? backed : fi);
    }
    struct fuse_file_info cached;
    copy_file_info(&cached, fi);
    cached.cache_readdir = 1;
    cached.keep_cache = 1;
    pthread_mutex_lock(&lock);
    counters[CACHED_LISTING_REPLIES]++;
    pthread_mutex_unlock(&lock);
    return real(req, &cached);
}

EXPORTED int cowfs_reply_err(fuse_req_t req, int err) __asm__("fuse_reply_err");
int cowfs_reply_err(fuse_req_t req, int err)
{
    static reply_err_t real;
    if (!real)
        real = (reply_err_t)next_symbol("fuse_reply_err");
    forget_opendir(req);
    forget_plain_listing(req);
    return real(req, err);
}

/* -- the control surface, called through ctypes ------------------------------------------ */

EXPORTED int cowfs_extensions_abi(void)
{
    return EXTENSIONS_ABI;
}

/* What to do for sessions made from now on: call before pyfuse3.init. */
EXPORTED void cowfs_extensions_configure(int listings, unsigned int capabilities)
{
    pthread_mutex_lock(&lock);
    cache_listings = listings;
    wanted_capabilities = capabilities;
    pthread_mutex_unlock(&lock);
}

EXPORTED unsigned long long cowfs_extensions_counter(int which)
{
    if (which < 0 || which >= COUNTERS)
        return 0;
    pthread_mutex_lock(&lock);
    unsigned long long value = counters[which];
    pthread_mutex_unlock(&lock);
    return value;
}

/* -- operations pyfuse3 does not route: fallocate, lseek, copy_file_range, ioctl ----------
 *
 * pyfuse3 leaves these entries of the table empty, so libfuse answers ENOSYS and the kernel
 * gives up on them (fallocate fails with EOPNOTSUPP, lseek misses every hole, ioctls fail
 * with ENOTTY). Here each gets a small handler that packs the request into one struct and
 * calls one Python function, registered through ctypes, synchronously: the handler runs
 * inside libfuse's processing of the request, on pyfuse3's trio thread, and ctypes takes the
 * GIL for the call. The Python side returns 0 or an errno and must not block for long.
 * Without a registered function the answer stays ENOSYS. Nothing is filled where pyfuse3
 * already has an entry (a future pyfuse3 that routes them itself wins). */

enum extra_operation {
    EXTRA_FALLOCATE = 1,        /* mode, offset, length */
    EXTRA_LSEEK = 2,            /* offset, whence in mode; result: the new offset */
    EXTRA_COPY_FILE_RANGE = 3,  /* fh -> fh_out, offset -> offset_out, length, flags in mode;
                                 * result: bytes copied */
    EXTRA_IOCTL = 4,            /* command in mode, ioctl flags; in/out payload; result: the
                                 * ioctl's return value */
};

/* Mirrored by fuse_extensions.ExtraRequest: change both, and EXTENSIONS_ABI. */
struct extra_request {
    int32_t operation;
    uint32_t flags;
    uint64_t fh;
    uint64_t fh_out;
    int64_t offset;
    int64_t offset_out;
    int64_t length;
    int64_t mode;
    const void *in;
    uint64_t in_size;
    void *out;
    uint64_t out_size;
    int64_t result;
};

typedef int (*extra_handler_t)(struct extra_request *);

/* The largest ioctl payload passed either way: the inode-flag ioctls carry 4 or 28 bytes. */
#define IOCTL_PAYLOAD_MAX 4096

/* The ioctl commands the Python side serves; every other one is answered ENOTTY here, without
 * a call into Python (Python's open() alone sends TCGETS for isatty on every file). */
#define SERVED_IOCTLS_MAX 8

static extra_handler_t extra_handler;
static int no_flush;
static unsigned int served_ioctls[SERVED_IOCTLS_MAX];
static unsigned int served_ioctl_count;

static int serves_ioctl(unsigned int command)
{
    int served = 0;
    pthread_mutex_lock(&lock);
    for (unsigned int i = 0; i < served_ioctl_count; i++)
        served |= served_ioctls[i] == command;
    pthread_mutex_unlock(&lock);
    return served;
}

/* *fi* as a file's open reply sends it: with noflush where asked, and always in a struct of
 * this library's size (libfuse reads the whole of one, the caller's may be shorter). */
static const struct fuse_file_info *without_flush(const struct fuse_file_info *fi)
{
    static __thread struct fuse_file_info marked;
    if (!fi || (!no_flush && caller_file_info_size == sizeof(*fi)))
        return fi;
    copy_file_info(&marked, fi);
    if (!no_flush)
        return &marked;
    marked.noflush = 1;
    pthread_mutex_lock(&lock);
    counters[NOFLUSH_REPLIES]++;
    pthread_mutex_unlock(&lock);
    return &marked;
}

/* Run *request* through the Python side: 0, or the errno to reply with. */
static int call_extra_handler(struct extra_request *request)
{
    pthread_mutex_lock(&lock);
    counters[EXTRA_REQUESTS]++;
    extra_handler_t handler = extra_handler;
    pthread_mutex_unlock(&lock);
    if (!handler)
        return ENOSYS;
    int err = handler(request);
    return err < 0 ? EIO : err;
}

static void extra_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                            off_t length, struct fuse_file_info *fi)
{
    (void)ino;
    struct extra_request request = {.operation = EXTRA_FALLOCATE, .fh = fi->fh,
                                    .offset = offset, .length = length, .mode = mode};
    fuse_reply_err(req, call_extra_handler(&request));
}

static void extra_lseek(fuse_req_t req, fuse_ino_t ino, off_t offset, int whence,
                        struct fuse_file_info *fi)
{
    (void)ino;
    struct extra_request request = {.operation = EXTRA_LSEEK, .fh = fi->fh, .offset = offset,
                                    .mode = whence};
    int err = call_extra_handler(&request);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_lseek(req, request.result);
}

static void extra_copy_file_range(fuse_req_t req, fuse_ino_t ino_in, off_t offset_in,
                                  struct fuse_file_info *fi_in, fuse_ino_t ino_out,
                                  off_t offset_out, struct fuse_file_info *fi_out, size_t length,
                                  int flags)
{
    (void)ino_in;
    (void)ino_out;
    struct extra_request request = {.operation = EXTRA_COPY_FILE_RANGE, .fh = fi_in->fh,
                                    .fh_out = fi_out->fh, .offset = offset_in,
                                    .offset_out = offset_out, .length = (int64_t)length,
                                    .mode = flags};
    int err = call_extra_handler(&request);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_write(req, (size_t)request.result);
}

/* libfuse 3.14 headers declare the command as unsigned int, older ones as int. */
static void extra_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int command, void *argument,
                        struct fuse_file_info *fi, unsigned flags, const void *in_buffer,
                        size_t in_size, size_t out_size)
{
    (void)ino;
    (void)argument;
    if (!serves_ioctl(command) || in_size > IOCTL_PAYLOAD_MAX || out_size > IOCTL_PAYLOAD_MAX) {
        fuse_reply_err(req, ENOTTY);
        return;
    }
    void *out = out_size ? calloc(1, out_size) : NULL;
    if (out_size && !out) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    struct extra_request request = {.operation = EXTRA_IOCTL, .flags = flags, .fh = fi->fh,
                                    .mode = command, .in = in_buffer, .in_size = in_size,
                                    .out = out, .out_size = out_size};
    int err = call_extra_handler(&request);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_ioctl(req, (int)request.result, out, out_size);
    free(out);
}

static void fill_extra_operations(struct fuse_lowlevel_ops *table)
{
    if (!table->fallocate)
        table->fallocate = extra_fallocate;
    if (!table->lseek)
        table->lseek = extra_lseek;
    if (!table->copy_file_range)
        table->copy_file_range = extra_copy_file_range;
    if (!table->ioctl)
        table->ioctl = (void *)extra_ioctl;
}

typedef int (*reply_create_t)(fuse_req_t, const struct fuse_entry_param *,
                              const struct fuse_file_info *);

EXPORTED int cowfs_reply_create(fuse_req_t req, const struct fuse_entry_param *entry,
                                const struct fuse_file_info *fi) __asm__("fuse_reply_create");
int cowfs_reply_create(fuse_req_t req, const struct fuse_entry_param *entry,
                       const struct fuse_file_info *fi)
{
    static reply_create_t real;
    if (!real)
        real = (reply_create_t)next_symbol("fuse_reply_create");
    fi = without_flush(fi);
    const struct fuse_file_info *backed = with_backing(req, fi);
    return real(req, entry, backed ? backed : fi);
}

/* The Python function that serves the extra operations (NULL: answer ENOSYS), the ioctl
 * commands it serves (at most SERVED_IOCTLS_MAX), and whether file open and create replies
 * carry noflush. Call before pyfuse3.init. */
EXPORTED void cowfs_extensions_set_handler(extra_handler_t handler, const unsigned int *ioctls,
                                           unsigned int ioctl_count, int noflush)
{
    pthread_mutex_lock(&lock);
    extra_handler = handler;
    served_ioctl_count = ioctl_count < SERVED_IOCTLS_MAX ? ioctl_count : SERVED_IOCTLS_MAX;
    for (unsigned int i = 0; i < served_ioctl_count; i++)
        served_ioctls[i] = ioctls[i];
    no_flush = noflush;
    pthread_mutex_unlock(&lock);
}

/* -- plain listings: READDIR through pyfuse3's readdirplus ---------------------------------
 *
 * pyfuse3 registers readdirplus only, so the kernel asks for every entry's attributes, and
 * the daemon resolves every name of a listing (`ls -f` of 10k names: 10k lookups, 10k nodes
 * the kernel must forget again). With READDIRPLUS_AUTO the kernel sends plain READDIR unless
 * it has seen a lookup in the directory (an `ls -l`). Here such a request goes to pyfuse3's
 * readdirplus handler; while it is outstanding, the entries pyfuse3 adds for it are written
 * with fuse_add_direntry (name, inode number, type: the rest of the attributes is ignored),
 * and the Python side asks `cowfs_extensions_plain_listing(fh)` to skip resolving the names
 * and counting lookups (the kernel counts none for plain entries). */

#define PENDING_PLAIN 64

struct plain_listing {
    fuse_req_t req;
    uint64_t fh;
};

static void (*pyfuse3_readdirplus)(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset,
                                   struct fuse_file_info *fi);
static struct plain_listing plain_listings[PENDING_PLAIN];
static unsigned int next_plain;
/* Outstanding plain requests: read without the lock, so read replies skip the search. */
static volatile int plain_outstanding;

static void plain_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset,
                          struct fuse_file_info *fi)
{
    pthread_mutex_lock(&lock);
    struct plain_listing *slot = &plain_listings[next_plain];
    if (!slot->req)
        plain_outstanding++;
    slot->req = req;
    slot->fh = fi->fh;
    next_plain = (next_plain + 1) % PENDING_PLAIN;
    counters[PLAIN_READDIRS]++;
    pthread_mutex_unlock(&lock);
    pyfuse3_readdirplus(req, ino, size, offset, fi);
}

static void fill_plain_readdir(struct fuse_lowlevel_ops *table)
{
    if (table->readdir || !table->readdirplus
        || !(wanted_capabilities & FUSE_CAP_READDIRPLUS_AUTO))
        return;
    pyfuse3_readdirplus = table->readdirplus;
    table->readdir = plain_readdir;
}

/* Whether an outstanding plain READDIR is *req* (or, with req NULL, one for handle *fh*). */
static int find_plain_listing(fuse_req_t req, uint64_t fh)
{
    if (!plain_outstanding)
        return 0;
    int found = 0;
    pthread_mutex_lock(&lock);
    for (unsigned int i = 0; i < PENDING_PLAIN && !found; i++) {
        const struct plain_listing *slot = &plain_listings[i];
        found = slot->req && (req ? slot->req == req : slot->fh == fh);
    }
    pthread_mutex_unlock(&lock);
    return found;
}

static void forget_plain_listing(fuse_req_t req)
{
    if (!plain_outstanding)
        return;
    pthread_mutex_lock(&lock);
    for (unsigned int i = 0; i < PENDING_PLAIN; i++) {
        if (plain_listings[i].req == req) {
            plain_listings[i].req = NULL;
            plain_outstanding--;
        }
    }
    pthread_mutex_unlock(&lock);
}

typedef size_t (*add_direntry_plus_t)(fuse_req_t, char *, size_t, const char *,
                                      const struct fuse_entry_param *, off_t);

EXPORTED size_t cowfs_add_direntry_plus(fuse_req_t req, char *buffer, size_t size,
                                        const char *name, const struct fuse_entry_param *entry,
                                        off_t offset) __asm__("fuse_add_direntry_plus");
size_t cowfs_add_direntry_plus(fuse_req_t req, char *buffer, size_t size, const char *name,
                               const struct fuse_entry_param *entry, off_t offset)
{
    static add_direntry_plus_t real;
    if (find_plain_listing(req, 0))
        return fuse_add_direntry(req, buffer, size, name, &entry->attr, offset);
    if (!real)
        real = (add_direntry_plus_t)next_symbol("fuse_add_direntry_plus");
    return real(req, buffer, size, name, entry, offset);
}

typedef int (*reply_buf_t)(fuse_req_t, const char *, size_t);

EXPORTED int cowfs_reply_buf(fuse_req_t req, const char *buffer, size_t size)
    __asm__("fuse_reply_buf");
int cowfs_reply_buf(fuse_req_t req, const char *buffer, size_t size)
{
    static reply_buf_t real;
    if (!real)
        real = (reply_buf_t)next_symbol("fuse_reply_buf");
    forget_plain_listing(req);
    return real(req, buffer, size);
}

/* Whether a plain READDIR is being answered for directory handle *fh*: its entries need a
 * name, an inode number and a type only, and count no lookup. */
EXPORTED int cowfs_extensions_plain_listing(uint64_t fh)
{
    return find_plain_listing(NULL, fh);
}

/* -- passthrough: file data between the kernel and the backing file ------------------------
 *
 * With libfuse >= 3.17 (and a kernel with FUSE passthrough, the daemon root), an open reply
 * may name a backing file the kernel then reads, writes and maps itself: no READ or WRITE
 * request reaches the daemon. The Python side announces every file handle before its open or
 * create reply (`cowfs_extensions_offer_backing`), with the fd the kernel may use or -1 (a
 * lower file, which a copy-up may replace while it is open). The kernel's rules are per
 * inode, and an open reply that breaks them fails the open (EIO or ETXTBSY):
 *
 *   - one backing file per inode, and while it has one, every open must pass through to
 *     that same file: so the backing id is kept per inode while its passthrough opens last,
 *     and closed when the last is released;
 *   - passthrough and cached opens of one inode exclude each other: an inode with a cached
 *     open (a handle announced with -1, or whose backing id could not be made) gets cached
 *     opens only, until they are all released.
 *
 * The Python side offers only a file's last copy, so an inode's backing file never has to
 * change while open; an offer of another file than the inode's backing one is answered as
 * is, which the kernel refuses (counted: CONFLICTING_OPENS). */

enum open_kind { OPEN_OFFERED, OPEN_CACHED, OPEN_PASSTHROUGH, OPEN_CONFLICTING };

struct open_inode {
    uint64_t ino;
    int backing_id;                 /* > 0 while passthrough opens use it */
    dev_t backing_device;           /* the file it names */
    ino_t backing_inode;
    unsigned int passthrough_opens;
    unsigned int cached_opens;
    struct open_inode *next;
};

struct open_handle {
    uint64_t fh;
    struct open_inode *inode;
    enum open_kind kind;
    int fd;                         /* the offered fd (-1: none), until the reply */
    struct open_handle *next;
};

#define OPEN_BUCKETS 1024

static int passthrough_wanted;
static int passthrough_failed;      /* the first backing open failed: no more tries */
static struct open_inode *open_inodes[OPEN_BUCKETS];
static struct open_handle *open_handles[OPEN_BUCKETS];
static void (*pyfuse3_release)(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);

static struct open_inode *open_inode(uint64_t ino)
{
    struct open_inode **bucket = &open_inodes[ino % OPEN_BUCKETS];
    for (struct open_inode *node = *bucket; node; node = node->next)
        if (node->ino == ino)
            return node;
    struct open_inode *node = calloc(1, sizeof(*node));
    if (node) {
        node->ino = ino;
        node->next = *bucket;
        *bucket = node;
    }
    return node;
}

static void drop_open_inode_if_unused(struct open_inode *unused)
{
    if (unused->passthrough_opens || unused->cached_opens)
        return;
    for (struct open_inode **link = &open_inodes[unused->ino % OPEN_BUCKETS]; *link;
         link = &(*link)->next) {
        if (*link == unused) {
            *link = unused->next;
            free(unused);
            return;
        }
    }
}

/* The handle entry for *fh*, unlinked from the table (the caller owns it), or NULL. */
static struct open_handle *take_open_handle(uint64_t fh)
{
    for (struct open_handle **link = &open_handles[fh % OPEN_BUCKETS]; *link;
         link = &(*link)->next) {
        struct open_handle *handle = *link;
        if (handle->fh == fh) {
            *link = handle->next;
            return handle;
        }
    }
    return NULL;
}

static void put_open_handle(struct open_handle *handle)
{
    struct open_handle **bucket = &open_handles[handle->fh % OPEN_BUCKETS];
    handle->next = *bucket;
    *bucket = handle;
}

#ifdef FUSE_CAP_PASSTHROUGH
/* What the open of *handle* is; called with the lock held, from the reply. */
static enum open_kind choose_open_kind(fuse_req_t req, struct open_handle *handle)
{
    struct open_inode *inode = handle->inode;
    struct stat file;
    if (handle->fd < 0 || fstat(handle->fd, &file) || !S_ISREG(file.st_mode))
        return inode->passthrough_opens ? OPEN_CONFLICTING : OPEN_CACHED;
    if (inode->cached_opens)
        return OPEN_CACHED;
    if (inode->passthrough_opens)
        return inode->backing_device == file.st_dev && inode->backing_inode == file.st_ino
               ? OPEN_PASSTHROUGH : OPEN_CONFLICTING;
    if (passthrough_failed)
        return OPEN_CACHED;
    int backing_id = fuse_passthrough_open(req, handle->fd);
    if (backing_id <= 0) {
        passthrough_failed = errno ? errno : EIO;
        return OPEN_CACHED;
    }
    counters[BACKING_FILES_OPENED]++;
    inode->backing_id = backing_id;
    inode->backing_device = file.st_dev;
    inode->backing_inode = file.st_ino;
    return OPEN_PASSTHROUGH;
}
#endif

/* *fi* as the open reply of a passthrough session sends it: NULL where nothing changes. */
static const struct fuse_file_info *with_backing(fuse_req_t req,
                                                 const struct fuse_file_info *fi)
{
    if (!passthrough_granted || !fi)
        return NULL;
    static __thread struct fuse_file_info marked;
    const struct fuse_file_info *reply = NULL;
    pthread_mutex_lock(&lock);
    struct open_handle *handle = take_open_handle(fi->fh);
    if (handle && handle->kind == OPEN_OFFERED) {
#ifdef FUSE_CAP_PASSTHROUGH
        handle->kind = choose_open_kind(req, handle);
#else
        (void)req;
        handle->kind = OPEN_CACHED;
#endif
        copy_file_info(&marked, fi);
        if (handle->kind == OPEN_PASSTHROUGH) {
            handle->inode->passthrough_opens++;
            counters[PASSTHROUGH_OPENS]++;
#ifdef FUSE_CAP_PASSTHROUGH
            marked.backing_id = handle->inode->backing_id;
#endif
            marked.keep_cache = 0;
            marked.direct_io = 0;
            reply = &marked;
        } else if (handle->kind == OPEN_CONFLICTING) {
            counters[CONFLICTING_OPENS]++;
        } else {
            handle->inode->cached_opens++;
        }
    }
    if (handle)
        put_open_handle(handle);
    pthread_mutex_unlock(&lock);
    return reply;
}

static void release_with_backing(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    pthread_mutex_lock(&lock);
    struct open_handle *handle = take_open_handle(fi->fh);
    if (handle) {
        struct open_inode *inode = handle->inode;
        if (handle->kind == OPEN_PASSTHROUGH && !--inode->passthrough_opens) {
#ifdef FUSE_CAP_PASSTHROUGH
            fuse_passthrough_close(req, inode->backing_id);
#endif
            inode->backing_id = 0;
        } else if (handle->kind == OPEN_CACHED) {
            inode->cached_opens--;
        }
        drop_open_inode_if_unused(inode);
        free(handle);
    }
    pthread_mutex_unlock(&lock);
    pyfuse3_release(req, ino, fi);
}

static void fill_passthrough(struct fuse_lowlevel_ops *table)
{
    if (!passthrough_wanted || !table->release)
        return;
    pyfuse3_release = table->release;
    table->release = release_with_backing;
}

/* After pyfuse3's init: ask for passthrough where the kernel offers it and the writeback
 * cache is not asked for (the kernel turns passthrough off under it). Backing files may be on
 * a stacked filesystem (an overlay under the layers): a stack depth of one. */
static void grant_passthrough(struct fuse_conn_info *conn)
{
#ifdef FUSE_CAP_PASSTHROUGH
    if (passthrough_wanted && (conn->capable & FUSE_CAP_PASSTHROUGH)
        && !(conn->want & FUSE_CAP_WRITEBACK_CACHE)) {
        conn->want |= FUSE_CAP_PASSTHROUGH;
        conn->max_backing_stack_depth = 1;
        passthrough_granted = 1;
        counters[PASSTHROUGH_GRANTED] = 1;
    }
#else
    (void)conn;
#endif
}

/* Whether sessions made from now on ask for passthrough; call before pyfuse3.init. Asking
 * does nothing where the library was built against libfuse < 3.17. */
EXPORTED int cowfs_extensions_configure_passthrough(int wanted)
{
#ifdef FUSE_CAP_PASSTHROUGH
    pthread_mutex_lock(&lock);
    passthrough_wanted = wanted;
    pthread_mutex_unlock(&lock);
    return 1;
#else
    (void)wanted;
    return 0;
#endif
}

/* Handle *fh* of inode *ino* reads and writes *fd*: the open or create reply for it, sent
 * next, may name that file as its backing file. */
EXPORTED void cowfs_extensions_offer_backing(uint64_t fh, uint64_t ino, int fd)
{
    if (!passthrough_granted)
        return;
    struct open_handle *handle = calloc(1, sizeof(*handle));
    if (!handle)
        return;
    pthread_mutex_lock(&lock);
    struct open_handle *unreplied = take_open_handle(fh);
    if (unreplied) {
        drop_open_inode_if_unused(unreplied->inode);
        free(unreplied);
    }
    handle->fh = fh;
    handle->fd = fd;
    handle->kind = OPEN_OFFERED;
    handle->inode = open_inode(ino);
    if (handle->inode)
        put_open_handle(handle);
    else
        free(handle);
    pthread_mutex_unlock(&lock);
}

/* Why backing files could not be made (an errno), 0 if they could. */
EXPORTED int cowfs_extensions_passthrough_error(void)
{
    return passthrough_failed;
}

/* -- O_TMPFILE: TMPFILE through pyfuse3's create handler --------------------------------
 *
 * libfuse 3.17 has a tmpfile entry at the end of the operations table (3.14 has none and
 * answers ENOSYS, which the kernel turns into EOPNOTSUPP for the rest of the mount); pyfuse3
 * 3.5.0 has no handler for it. The request is a create without a name: the same fuse_create_in
 * (flags, with O_TMPFILE among them), answered with the same entry and open reply. So it goes
 * to pyfuse3's create handler, which builds that reply, under a name the kernel never sends to
 * create (the kernel itself calls a tmpfile's dentry "/"); Operations.create
 * (cowfs/mount.py) recognises it (fuse_extensions.TMPFILE_NAME) and makes an unnamed file. */

#if FUSE_VERSION >= FUSE_MAKE_VERSION(3, 17)
#define TMPFILE_NAME "/"

static void (*pyfuse3_create)(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                              struct fuse_file_info *fi);

static void tmpfile_through_create(fuse_req_t req, fuse_ino_t parent, mode_t mode,
                                   struct fuse_file_info *fi)
{
    pthread_mutex_lock(&lock);
    counters[TMPFILE_REQUESTS]++;
    pthread_mutex_unlock(&lock);
    /* pyfuse3 copies the name and the caller's part of *fi* before it returns. */
    pyfuse3_create(req, parent, TMPFILE_NAME, mode, fi);
}

static void fill_tmpfile(struct fuse_lowlevel_ops *table)
{
    if (table->tmpfile || !table->create)
        return;
    pyfuse3_create = table->create;
    table->tmpfile = tmpfile_through_create;
    pthread_mutex_lock(&lock);
    counters[TMPFILE_ROUTED] = 1;
    pthread_mutex_unlock(&lock);
}
#else
/* Headers without a tmpfile entry: libfuse answers TMPFILE with ENOSYS. */
static void fill_tmpfile(struct fuse_lowlevel_ops *table)
{
    (void)table;
}
#endif

/* -- killing suid and sgid in the daemon: FUSE_HANDLE_KILLPRIV_V2 -------------------------
 *
 * Without it the FUSE kernel kills suid/sgid itself and, since FUSE clears SB_NOSEC, asks the
 * daemon for security.capability before every write(2) (a third of an untar's requests).
 * With it the kernel sets SB_NOSEC (it asks once per inode until its attributes change) and
 * leaves the mode bits to the daemon, telling it per request that the caller lacks
 * CAP_FSETID: FUSE_WRITE_KILL_SUIDGID in a WRITE's write_flags, FATTR_KILL_SUIDGID in a
 * SETATTR's valid (a truncate without CAP_FSETID, and every chown of a non-directory),
 * FUSE_OPEN_KILL_SUIDGID in an OPEN's open_flags (O_TRUNC without CAP_FSETID). libfuse (up
 * to 3.18) passes none of these to the operations, so the raw request is read here, in
 * fuse_session_process_buf, and each flagged one is told to one Python function, registered
 * through ctypes, synchronously and before the request is dispatched: pyfuse3 runs the
 * request's handler right after this call returns, before it reads another request, so the
 * handler finds what it was told. (CREATE's flag is ignored: cowfs's create is exclusive, so
 * nothing it opens existed before, and the VFS truncates no file it created.)
 * security.capability is left to the kernel and to the upper layer's filesystem: the VFS
 * asks for it on the first write of an inode and removes it itself, and the upper's
 * filesystem removes it when the daemon writes, truncates or chowns.
 *
 * Granted only where the kernel offers it and a handler is registered. Then SPLICE_READ is
 * taken out of `want` (libfuse asks for it because pyfuse3 has a write_buf handler): a
 * spliced WRITE stays in a pipe, where it could not be read here and its kill would be lost.
 * Splicing saves pyfuse3 nothing anyway, which copies the data into a Python bytes object.
 * Built only against headers that know the capability (libfuse >= 3.17): on older ones
 * nothing here is compiled but the setter, and the interposer does not exist. */

/* opcode, node id, handle (0 where the request has none), the caller's uid, gid and pid */
typedef void (*kill_handler_t)(uint32_t, uint64_t, uint64_t, uint32_t, uint32_t, uint32_t);

static kill_handler_t kill_handler;

/* The Python function told of each request that asks to kill suid/sgid (NULL: no
 * FUSE_HANDLE_KILLPRIV_V2 asked for). Call before pyfuse3.init. */
EXPORTED void cowfs_extensions_set_kill_handler(kill_handler_t handler)
{
    pthread_mutex_lock(&lock);
    kill_handler = handler;
    pthread_mutex_unlock(&lock);
}

#ifdef FUSE_CAP_HANDLE_KILLPRIV_V2

/* The FUSE protocol's numbers for the few fields read here (linux/fuse.h, protocol 7.33):
 * libfuse installs no header with them. Offsets are into the op's argument struct, which
 * follows the 40-byte request header. */
#define REQUEST_HEADER_SIZE 40
#define HEADER_OPCODE_AT 4
#define HEADER_NODEID_AT 16
#define HEADER_UID_AT 24        /* then gid, pid */
#define OPCODE_SETATTR 4
#define OPCODE_OPEN 14
#define OPCODE_WRITE 16
#define SETATTR_VALID_AT 0      /* fuse_setattr_in.valid */
#define SETATTR_FH_AT 8
#define SETATTR_FH (1u << 3)            /* FATTR_FH */
#define SETATTR_KILL_SUIDGID (1u << 11) /* FATTR_KILL_SUIDGID */
#define WRITE_FH_AT 0           /* fuse_write_in.fh */
#define WRITE_FLAGS_AT 20       /* fuse_write_in.write_flags */
#define WRITE_KILL_SUIDGID (1u << 2)    /* FUSE_WRITE_KILL_SUIDGID */
#define OPEN_FLAGS_AT 4         /* fuse_open_in.open_flags */
#define OPEN_KILL_SUIDGID (1u << 0)     /* FUSE_OPEN_KILL_SUIDGID */

/* Set at INIT when granted; read without the lock on every request after. */
static int killing;

static unsigned int killpriv_capability(struct fuse_conn_info *conn)
{
    pthread_mutex_lock(&lock);
    killing = kill_handler && (conn->capable & FUSE_CAP_HANDLE_KILLPRIV_V2);
    pthread_mutex_unlock(&lock);
    if (!killing)
        return 0;
    conn->want &= ~FUSE_CAP_SPLICE_READ;
    return FUSE_CAP_HANDLE_KILLPRIV_V2;
}

static uint32_t read_u32(const char *from)
{
    uint32_t value;
    memcpy(&value, from, sizeof(value));
    return value;
}

static uint64_t read_u64(const char *from)
{
    uint64_t value;
    memcpy(&value, from, sizeof(value));
    return value;
}

/* Tell the Python side of *request* if it asks to kill suid/sgid; one switch for the rest. */
static void notice_kill_request(const char *request, size_t size)
{
    if (size < REQUEST_HEADER_SIZE)
        return;
    uint32_t opcode = read_u32(request + HEADER_OPCODE_AT);
    const char *argument = request + REQUEST_HEADER_SIZE;
    size_t argument_size = size - REQUEST_HEADER_SIZE;
    uint64_t fh = 0;
    switch (opcode) {
    case OPCODE_WRITE:
        if (argument_size < WRITE_FLAGS_AT + 4
            || !(read_u32(argument + WRITE_FLAGS_AT) & WRITE_KILL_SUIDGID))
            return;
        fh = read_u64(argument + WRITE_FH_AT);
        break;
    case OPCODE_SETATTR:
        if (argument_size < SETATTR_FH_AT + 8)
            return;
        uint32_t valid = read_u32(argument + SETATTR_VALID_AT);
        if (!(valid & SETATTR_KILL_SUIDGID))
            return;
        if (valid & SETATTR_FH)
            fh = read_u64(argument + SETATTR_FH_AT);
        break;
    case OPCODE_OPEN:
        if (argument_size < OPEN_FLAGS_AT + 4
            || !(read_u32(argument + OPEN_FLAGS_AT) & OPEN_KILL_SUIDGID))
            return;
        break;
    default:
        return;
    }
    pthread_mutex_lock(&lock);
    counters[KILL_REQUESTS]++;
    kill_handler_t handler = kill_handler;
    pthread_mutex_unlock(&lock);
    if (handler)
        handler(opcode, read_u64(request + HEADER_NODEID_AT), fh,
                read_u32(request + HEADER_UID_AT), read_u32(request + HEADER_UID_AT + 4),
                read_u32(request + HEADER_UID_AT + 8));
}

typedef void (*process_buf_t)(struct fuse_session *, const struct fuse_buf *);

EXPORTED void cowfs_session_process_buf(struct fuse_session *session,
                                        const struct fuse_buf *buffer)
    __asm__("fuse_session_process_buf");
void cowfs_session_process_buf(struct fuse_session *session, const struct fuse_buf *buffer)
{
    static process_buf_t real;
    if (!real)
        real = (process_buf_t)next_symbol("fuse_session_process_buf");
    if (killing && !(buffer->flags & FUSE_BUF_IS_FD))
        notice_kill_request(buffer->mem, buffer->size);
    real(session, buffer);
}

#else

static unsigned int killpriv_capability(struct fuse_conn_info *conn)
{
    (void)conn;
    return 0;
}

#endif
