/* What a payload of `cowfs run` can ask of the kernel: built static at test time, run inside.
 *
 *   sandbox_probe key DESCRIPTION    search the user keyring for a "user" key, print its payload
 *   sandbox_probe escape             the chroot escape (chroot into a subdirectory, keep the
 *                                    working directory outside it, climb, chroot there); then
 *                                    prints the names in the root it reached
 *   sandbox_probe FAMILY...          one call of each family, with arguments the kernel refuses
 *                                    before it acts; prints "FAMILY ERRNO-NAME" or "FAMILY ok"
 *
 * Each call runs in a child of its own, so one that changes the process (unshare) changes no
 * other. The arguments are chosen so that even with every capability and no filter nothing
 * happens to the host: a missing path, a bad flag, a NULL the kernel must copy from.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MISSING "/cowfs-probe-no-such-path"
#define KEY_SPEC_SESSION_KEYRING (-3L)
#define KEY_SPEC_USER_KEYRING (-4L)
#define KEYCTL_GET_KEYRING_ID 0
#define KEYCTL_SEARCH 10
#define KEYCTL_READ 11

static long call(const char *family)
{
    if (!strcmp(family, "kexec"))          /* too many segments, an unknown flag: EINVAL */
        return syscall(SYS_kexec_load, 0L, 100000L, NULL, 0x80L);
    if (!strcmp(family, "modules"))        /* an empty image: ENOEXEC */
        return syscall(SYS_init_module, NULL, 0L, "");
    if (!strcmp(family, "reboot"))         /* no magic: EINVAL */
        return syscall(SYS_reboot, 0L, 0L, 0L, NULL);
    if (!strcmp(family, "swap"))
        return syscall(SYS_swapon, MISSING, 0L);
    if (!strcmp(family, "clock"))          /* the new time must be copied from NULL: EFAULT */
        return syscall(SYS_clock_settime, (long)CLOCK_REALTIME, NULL);
    if (!strcmp(family, "accounting"))
        return syscall(SYS_acct, MISSING);
    if (!strcmp(family, "quota")) {
        char buffer[64];
        return syscall(SYS_quotactl, 0x800004L /* Q_GETFMT, USRQUOTA */, MISSING, 0L, buffer);
    }
    if (!strcmp(family, "io_ports"))       /* level 4 does not exist: EINVAL */
        return syscall(SYS_iopl, 4L);
    if (!strcmp(family, "keyring"))
        return syscall(SYS_keyctl, (long)KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0L);
    if (!strcmp(family, "bpf"))            /* no such command: EINVAL */
        return syscall(SYS_bpf, 9999L, NULL, 0L);
    if (!strcmp(family, "perf"))           /* the attributes must be copied from NULL */
        return syscall(SYS_perf_event_open, NULL, 0L, -1L, -1L, 0L);
    if (!strcmp(family, "userfaultfd"))    /* unknown flags: EINVAL */
        return syscall(SYS_userfaultfd, 0x7fff0000L);
    if (!strcmp(family, "file_handles"))
        return syscall(SYS_open_by_handle_at, -1L, NULL, 0L);
    if (!strcmp(family, "io_uring"))       /* the parameters must be copied from NULL */
        return syscall(SYS_io_uring_setup, 1L, NULL);
    if (!strcmp(family, "kernel_log"))     /* the size of the kernel's log buffer */
        return syscall(SYS_syslog, 10L, NULL, 0L);
    if (!strcmp(family, "mount"))
        return syscall(SYS_mount, "none", MISSING, "tmpfs", 0L, NULL);
    if (!strcmp(family, "namespaces"))     /* allowed to anyone where the kernel allows it */
        return syscall(SYS_unshare, (long)CLONE_NEWUSER);
    if (!strcmp(family, "clone_namespace")) {
        long child = syscall(SYS_clone, (long)(CLONE_NEWUSER | SIGCHLD), 0L, NULL, NULL, 0L);
        if (child == 0)
            _exit(0);
        if (child > 0)
            waitpid((pid_t)child, NULL, 0);
        return child;
    }
    if (!strcmp(family, "clone3"))         /* no arguments: EFAULT or EINVAL */
        return syscall(SYS_clone3, NULL, 0L);
    fprintf(stderr, "sandbox_probe: unknown family %s\n", family);
    exit(2);
}

static int probe(const char *family)
{
    int channel[2];
    if (pipe(channel) != 0)
        return 1;
    pid_t child = fork();
    if (child == 0) {
        close(channel[0]);
        int answer = call(family) < 0 ? errno : 0;
        if (write(channel[1], &answer, sizeof answer) != sizeof answer)
            _exit(1);
        _exit(0);
    }
    close(channel[1]);
    int answer = -1;
    ssize_t got = read(channel[0], &answer, sizeof answer);
    close(channel[0]);
    int status;
    waitpid(child, &status, 0);
    if (got != sizeof answer) {
        printf("%s killed\n", family);
        return 0;
    }
    printf("%s %s\n", family, answer ? strerrorname_np(answer) : "ok");
    return 0;
}

static int read_key(const char *description)
{
    long key = syscall(SYS_keyctl, (long)KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, "user",
                       description, 0L);
    if (key < 0) {
        printf("search %s\n", strerrorname_np(errno));
        return 0;
    }
    char secret[256] = {0};
    long length = syscall(SYS_keyctl, (long)KEYCTL_READ, key, secret, sizeof secret - 1);
    if (length < 0)
        printf("read %s\n", strerrorname_np(errno));
    else
        printf("secret %s\n", secret);
    return 0;
}

static int escape(void)
{
    if (mkdir("/cowfs-probe-jail", 0700) != 0 && errno != EEXIST) {
        printf("mkdir %s\n", strerrorname_np(errno));
        return 0;
    }
    if (chdir("/") != 0 || chroot("/cowfs-probe-jail") != 0) {
        printf("chroot %s\n", strerrorname_np(errno));
        return 0;
    }
    for (int i = 0; i < 64; i++)
        if (chdir("..") != 0)
            break;
    if (chroot(".") != 0) {
        printf("chroot %s\n", strerrorname_np(errno));
        return 0;
    }
    DIR *root = opendir("/");
    for (struct dirent *entry; root && (entry = readdir(root)) != NULL;)
        printf("%s\n", entry->d_name);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "escape"))
        return escape();
    if (argc == 3 && !strcmp(argv[1], "key"))
        return read_key(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i < argc; i++)
        if (probe(argv[i]) != 0)
            return 1;
    return 0;
}
