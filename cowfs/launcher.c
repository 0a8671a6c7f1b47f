/* The `cowfs` command as the installer builds it: a warm command without an interpreter.
 *
 * Starting Python costs 10-15 ms here, more than a warm mount's own work. So for the commands a
 * supervisor serves (client.py's WARM_COMMANDS and the mount-program form) this program does
 * what cowfs/client.py does, in C: it finds the supervisor's socket (the same slot), sends the
 * same marshal'ed request with the caller's stdio and working directory, forwards signals to
 * the command's process and exits with its status. Everything else, and anything unexpected
 * (no supervisor yet, a cold or stale answer, a name or variable that is not UTF-8, a socket
 * path too long), runs the Python launcher in place, which does the full job: so this file
 * only ever makes things faster, never different. client.py is the reference; a test runs
 * both against one supervisor.
 *
 * Built by scripts/install.sh with the paths of its install:
 *   COWFS_PYTHON   the interpreter (sys.executable)
 *   COWFS_PREFIX   its sys.prefix (part of the slot)
 *   COWFS_PACKAGE  the package's directory (the slot, and the build stamp)
 *   COWFS_SOURCE_STAMP  "SIZE:MTIME_NS" of this file when built: if it changed since, the
 *                  protocol may have too, and the Python launcher runs instead.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

extern char **environ;

static const char *const warm_commands[] = {"mount", "umount", "run", "cleanup", "list", "stats",
                                            "refresh", NULL};
static const char *const warm_layer_actions[] = {"add", "remove", NULL};
static const int forwarded_signals[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
static pid_t command_pid;

/* Run the Python launcher with the same arguments: the answer to everything not handled. */
static void run_python(char **argv) {
    int count = 0;
    while (argv[count] != NULL)
        count++;
    char **arguments = calloc(count + 5, sizeof *arguments);
    if (arguments != NULL) {
        arguments[0] = COWFS_PYTHON;
        arguments[1] = "-P";                 /* no working directory on sys.path */
        arguments[2] = "-c";
        arguments[3] = "from cowfs.client import launch; launch()";
        for (int index = 1; index <= count; index++)
            arguments[3 + index] = argv[index];
        execv(COWFS_PYTHON, arguments);
    }
    fprintf(stderr, "cowfs: cannot start %s: %s\n", COWFS_PYTHON, strerror(errno));
    exit(1);
}

static int is_utf8(const unsigned char *text) {
    while (*text) {
        int more = *text < 0x80 ? 0 : (*text & 0xe0) == 0xc0 ? 1 : (*text & 0xf0) == 0xe0 ? 2
                   : (*text & 0xf8) == 0xf0 ? 3 : -1;
        if (more < 0 || (more == 1 && *text < 0xc2))
            return 0;
        unsigned int point = *text & (more ? 0x3f >> more : 0x7f);
        text++;
        for (int index = 0; index < more; index++, text++) {
            if ((*text & 0xc0) != 0x80)
                return 0;
            point = point << 6 | (*text & 0x3f);
        }
        /* What Python's decoder refuses: overlong forms, surrogates, beyond U+10FFFF. */
        if ((more == 2 && (point < 0x800 || (point >= 0xd800 && point <= 0xdfff)))
            || (more == 3 && (point < 0x10000 || point > 0x10ffff)))
            return 0;
    }
    return 1;
}

/* client.wants_warm */
static int wants_warm(int argc, char **argv) {
    const char *choice = getenv("COWFS_SUPERVISOR");
    if ((choice != NULL && strcmp(choice, "off") == 0) || argc < 2)
        return 0;
    for (int index = 1; index < argc; index++)
        if (strcmp(argv[index], "-f") == 0 || strcmp(argv[index], "--foreground") == 0)
            return 0;
    int warm = 0;
    for (int index = 0; warm_commands[index] != NULL; index++)
        warm |= strcmp(argv[1], warm_commands[index]) == 0;
    for (int index = 0; argc > 2 && warm_layer_actions[index] != NULL; index++)
        warm |= strcmp(argv[1], "layer") == 0 && strcmp(argv[2], warm_layer_actions[index]) == 0;
    if (warm) {
        for (int argument = 1; argument < argc && strcmp(argv[argument], "--") != 0; argument++)
            if (strcmp(argv[argument], "-h") == 0 || strcmp(argv[argument], "--help") == 0)
                return 0;
        return 1;
    }
    return strncmp(argv[1], "-o", 2) == 0 || strcmp(argv[1], "-d") == 0
           || strcmp(argv[1], "-s") == 0;
}

/* client._fnv1a, fed in pieces */
static uint64_t fnv1a(uint64_t value, const char *bytes, size_t length) {
    for (size_t index = 0; index < length; index++)
        value = (value ^ (unsigned char)bytes[index]) * 0x100000001b3ULL;
    return value;
}

#define FNV_START 0xcbf29ce484222325ULL

static const char *variable(const char *name) {
    const char *value = getenv(name);
    return value != NULL ? value : "";
}

/* client.slot: the first 12 hex digits of the digest of prefix, package and library path. */
static void slot(char out[13]) {
    const char *parts[] = {COWFS_PREFIX, COWFS_PACKAGE, variable("LD_LIBRARY_PATH"),
                           variable("LD_PRELOAD")};
    uint64_t value = FNV_START;
    for (int index = 0; index < 4; index++) {
        if (index > 0)
            value = fnv1a(value, "", 1);
        value = fnv1a(value, parts[index], strlen(parts[index]));
    }
    char digits[17];
    snprintf(digits, sizeof digits, "%016llx", (unsigned long long)value);
    memcpy(out, digits, 12);
    out[12] = '\0';
}

static int by_name(const void *left, const void *right) {
    return strcmp(*(char *const *)left, *(char *const *)right);
}

static int has_suffix(const char *name, const char *suffix) {
    size_t length = strlen(name), suffix_length = strlen(suffix);
    return length >= suffix_length && strcmp(name + length - suffix_length, suffix) == 0;
}

/* client.build: "NAME:MTIME_NS:SIZE" of the package's .py and .so files, sorted, joined by
 * spaces, digested. 0 if the directory cannot be read. */
static int build(char out[17]) {
    DIR *directory = opendir(COWFS_PACKAGE);
    if (directory == NULL)
        return 0;
    char **stamps = NULL;
    size_t count = 0, capacity = 0;
    struct dirent *entry;
    int good = 1;
    while (good && (entry = readdir(directory)) != NULL) {
        if (!has_suffix(entry->d_name, ".py") && !has_suffix(entry->d_name, ".so"))
            continue;
        struct stat status;
        if (fstatat(dirfd(directory), entry->d_name, &status, AT_SYMLINK_NOFOLLOW) != 0
            || !is_utf8((const unsigned char *)entry->d_name)) {
            good = 0;
            break;
        }
        if (count == capacity) {
            capacity = capacity ? capacity * 2 : 64;
            char **grown = realloc(stamps, capacity * sizeof *stamps);
            if (grown == NULL) {
                good = 0;
                break;
            }
            stamps = grown;
        }
        long long mtime_ns = (long long)status.st_mtim.tv_sec * 1000000000LL
                             + status.st_mtim.tv_nsec;
        if (asprintf(&stamps[count], "%s:%lld:%lld", entry->d_name, mtime_ns,
                     (long long)status.st_size) < 0) {
            good = 0;
            break;
        }
        count++;
    }
    closedir(directory);
    if (good) {
        qsort(stamps, count, sizeof *stamps, by_name);
        uint64_t value = FNV_START;
        for (size_t index = 0; index < count; index++) {
            if (index > 0)
                value = fnv1a(value, " ", 1);
            value = fnv1a(value, stamps[index], strlen(stamps[index]));
        }
        snprintf(out, 17, "%016llx", (unsigned long long)value);
    }
    for (size_t index = 0; index < count; index++)
        free(stamps[index]);
    free(stamps);
    return good;
}

/* This file as it was when built: otherwise the Python launcher speaks for it. */
static int source_unchanged(void) {
    struct stat status;
    char stamp[64];
    if (stat(COWFS_PACKAGE "/launcher.c", &status) != 0)
        return 0;
    snprintf(stamp, sizeof stamp, "%lld:%lld", (long long)status.st_size,
             (long long)status.st_mtim.tv_sec * 1000000000LL + status.st_mtim.tv_nsec);
    return strcmp(stamp, COWFS_SOURCE_STAMP) == 0;
}

/* -- the subset of marshal the request and the replies use ----------------------------- */

struct buffer {
    char *data;
    size_t length, capacity;
    int failed;
};

static void put(struct buffer *buffer, const void *bytes, size_t length) {
    if (buffer->failed)
        return;
    if (buffer->length + length > buffer->capacity) {
        size_t capacity = buffer->capacity ? buffer->capacity : 4096;
        while (capacity < buffer->length + length)
            capacity *= 2;
        char *grown = realloc(buffer->data, capacity);
        if (grown == NULL) {
            buffer->failed = 1;
            return;
        }
        buffer->data = grown;
        buffer->capacity = capacity;
    }
    memcpy(buffer->data + buffer->length, bytes, length);
    buffer->length += length;
}

static void put_int32(struct buffer *buffer, int32_t value) {
    unsigned char bytes[4] = {value & 0xff, value >> 8 & 0xff, value >> 16 & 0xff,
                              value >> 24 & 0xff};
    put(buffer, bytes, 4);
}

static void put_string(struct buffer *buffer, const char *text, size_t length) {
    put(buffer, "u", 1);                 /* TYPE_UNICODE: a length, then UTF-8 */
    put_int32(buffer, (int32_t)length);
    put(buffer, text, length);
}

static void put_key(struct buffer *buffer, const char *key) {
    put_string(buffer, key, strlen(key));
}

/* {"argv": [...], "environment": {...}, "umask": N, "build": "..."}; 0 if something is not
 * UTF-8 (Python would send it with surrogates: let it). */
static int encode_request(struct buffer *buffer, int argc, char **argv, const char *stamp) {
    put(buffer, "{", 1);
    put_key(buffer, "argv");
    put(buffer, "[", 1);
    put_int32(buffer, argc - 1);
    for (int index = 1; index < argc; index++) {
        if (!is_utf8((const unsigned char *)argv[index]))
            return 0;
        put_string(buffer, argv[index], strlen(argv[index]));
    }
    put_key(buffer, "environment");
    put(buffer, "{", 1);
    for (char **entry = environ; *entry != NULL; entry++) {
        const char *equals = strchr(*entry, '=');
        if (equals == NULL)
            continue;
        if (!is_utf8((const unsigned char *)*entry))
            return 0;
        size_t key_length = equals - *entry;
        int seen = 0;                     /* os.environ keeps the first of a repeated name */
        for (char **earlier = environ; earlier != entry && !seen; earlier++)
            seen = strncmp(*earlier, *entry, key_length + 1) == 0;
        if (seen)
            continue;
        put_string(buffer, *entry, key_length);
        put_string(buffer, equals + 1, strlen(equals + 1));
    }
    put(buffer, "0", 1);                  /* TYPE_NULL ends a dict */
    put_key(buffer, "umask");
    mode_t mask = umask(022);
    umask(mask);
    put(buffer, "i", 1);
    put_int32(buffer, (int32_t)mask);
    put_key(buffer, "build");
    put_string(buffer, stamp, strlen(stamp));
    put(buffer, "0", 1);
    return !buffer->failed;
}

enum reply_kind { REPLY_UNKNOWN, REPLY_PID, REPLY_RETURNCODE };

struct reply {
    enum reply_kind kind;
    long value;
};

static int take_int32(const unsigned char **cursor, const unsigned char *end, int32_t *value) {
    if (end - *cursor < 4)
        return 0;
    const unsigned char *bytes = *cursor;
    *value = (int32_t)((uint32_t)bytes[0] | (uint32_t)bytes[1] << 8 | (uint32_t)bytes[2] << 16
                       | (uint32_t)bytes[3] << 24);
    *cursor += 4;
    return 1;
}

/* A string of marshal's (the short and long ASCII and the Unicode types); its bytes. */
static int take_string(const unsigned char **cursor, const unsigned char *end,
                       const unsigned char **text, int32_t *length) {
    if (*cursor >= end)
        return 0;
    unsigned char type = *(*cursor)++ & 0x7f;      /* without FLAG_REF */
    if (type == 'z' || type == 'Z') {
        if (*cursor >= end)
            return 0;
        *length = *(*cursor)++;
    } else if (type == 'a' || type == 'A' || type == 'u' || type == 't') {
        if (!take_int32(cursor, end, length) || *length < 0)
            return 0;
    } else {
        return 0;
    }
    if (end - *cursor < *length)
        return 0;
    *text = *cursor;
    *cursor += *length;
    return 1;
}

/* The supervisor's one-entry answers: {"pid": N}, {"returncode": N}; anything else (cold,
 * stale, or unreadable) is REPLY_UNKNOWN. */
static struct reply decode_reply(const unsigned char *data, size_t size) {
    struct reply reply = {REPLY_UNKNOWN, 0};
    const unsigned char *cursor = data, *end = data + size, *key;
    int32_t key_length, value;
    if (size < 2 || (data[0] & 0x7f) != '{')
        return reply;
    cursor++;
    if (!take_string(&cursor, end, &key, &key_length) || cursor >= end)
        return reply;
    int is_pid = key_length == 3 && memcmp(key, "pid", 3) == 0;
    int is_returncode = key_length == 10 && memcmp(key, "returncode", 10) == 0;
    if ((!is_pid && !is_returncode) || (*cursor++ & 0x7f) != 'i' || !take_int32(&cursor, end, &value))
        return reply;
    reply.kind = is_pid ? REPLY_PID : REPLY_RETURNCODE;
    reply.value = value;
    return reply;
}

static struct reply receive(int connection) {
    static unsigned char data[65536];
    ssize_t size;
    do
        size = recv(connection, data, sizeof data, 0);
    while (size < 0 && errno == EINTR);
    struct reply none = {REPLY_UNKNOWN, 0};
    return size > 0 ? decode_reply(data, (size_t)size) : none;
}

static void forward(int signum) {
    if (command_pid > 0)
        kill(command_pid, signum);
}

static int exit_status(long returncode) {
    return returncode < 0 ? 128 - (int)returncode : (int)returncode;
}

int main(int argc, char **argv) {
    if (!wants_warm(argc, argv) || !source_unchanged())
        run_python(argv);
    const char *directory = getenv("COWFS_RUNTIME_DIR");
    char *path = NULL;
    char name[13], stamp[17];
    slot(name);
    int made = -1;
    if (directory != NULL && *directory)
        made = asprintf(&path, "%s/supervisor-%s.sock", directory, name);
    else if (geteuid() == 0)
        made = asprintf(&path, "/run/cowfs/supervisor-%s.sock", name);
    else if ((directory = getenv("XDG_RUNTIME_DIR")) != NULL && *directory)
        made = asprintf(&path, "%s/cowfs/supervisor-%s.sock", directory, name);
    if (made < 0)
        path = NULL;
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    if (path == NULL || strlen(path) >= sizeof address.sun_path || !build(stamp))
        run_python(argv);
    strcpy(address.sun_path, path);

    struct buffer message = {0};
    if (!encode_request(&message, argc, argv, stamp))
        run_python(argv);
    int connection = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (connection < 0 || connect(connection, (struct sockaddr *)&address, sizeof address) != 0)
        run_python(argv);      /* no supervisor: the Python launcher starts one */

    int fds[4];
    for (int fd = 0; fd < 3; fd++) {
        struct stat status;
        /* A closed stdio reads as /dev/null, as at exec. */
        fds[fd] = fstat(fd, &status) == 0 ? fd : open("/dev/null", O_RDWR | O_CLOEXEC);
    }
    fds[3] = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fds[0] < 0 || fds[1] < 0 || fds[2] < 0 || fds[3] < 0)
        run_python(argv);
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec piece = {.iov_base = message.data, .iov_len = message.length};
    struct msghdr header = {.msg_iov = &piece, .msg_iovlen = 1, .msg_control = control,
                            .msg_controllen = sizeof control};
    struct cmsghdr *rights = CMSG_FIRSTHDR(&header);
    rights->cmsg_level = SOL_SOCKET;
    rights->cmsg_type = SCM_RIGHTS;
    rights->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(rights), fds, sizeof fds);
    if (sendmsg(connection, &header, MSG_NOSIGNAL) < 0)
        run_python(argv);
    for (int index = 0; index < 4; index++)
        if (fds[index] > 2)
            close(fds[index]);

    struct reply reply = receive(connection);
    if (reply.kind == REPLY_RETURNCODE)
        return exit_status(reply.value);
    if (reply.kind != REPLY_PID) {
        /* cold, stale or none: nothing ran; Python runs it, here or through a new supervisor */
        close(connection);
        run_python(argv);
    }
    command_pid = (pid_t)reply.value;
    struct sigaction action = {.sa_handler = forward};
    sigemptyset(&action.sa_mask);
    for (size_t index = 0; index < sizeof forwarded_signals / sizeof *forwarded_signals; index++)
        sigaction(forwarded_signals[index], &action, NULL);
    reply = receive(connection);
    if (reply.kind != REPLY_RETURNCODE) {
        fputs("cowfs: the command's process ended without an exit status (its supervisor was "
              "stopped?)\n", stderr);
        return 1;
    }
    return exit_status(reply.value);
}
