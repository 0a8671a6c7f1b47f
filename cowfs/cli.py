"""`cowfs mount / umount / demo`: argument parsing, the daemon's start, exit codes."""

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence

import cowfs
from cowfs import daemon, options
from cowfs.layers import (
    LayerStack,
    LayoutError,
    open_stack,
    parse_lowerdirs,
    read_mountinfo,
    unmount,
)
from cowfs.sandbox import Sandbox, SandboxError, check_run_options, sweep_leftovers

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_UNEXPECTED = 1     # a bug: the traceback is printed
EXIT_USAGE = 2          # bad arguments, options or layer layout (as argparse)
EXIT_MOUNT_FAILED = 32  # the kernel or the daemon could not make the mount (as mount(8))

EXIT_CODES_HELP = f"""exit status:
  {EXIT_OK}   success
  {EXIT_UNEXPECTED}   unexpected failure (a bug; a traceback is printed)
  {EXIT_USAGE}   bad arguments, options or layer layout
  {EXIT_MOUNT_FAILED}  the mount could not be made or unmade
"""
# The host ids of a --userns payload's 0..65535: podman's and /etc/subuid's usual first range.
DEFAULT_USERNS = "100000:65536"
SUBCOMMANDS = ("mount", "umount", "run", "cleanup", "demo", "layer", "image", "supervisor",
               "list", "stats", "refresh")


class FreshProcessNeeded(Exception):
    """The command needs an interpreter that has loaded nothing yet (a warm process that
    loaded the kernel-cache library cannot mount without it)."""


class CliError(Exception):
    """A failure the user can act on: printed as one line, with an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@functools.cache
def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """Built once per process (2 ms here): the supervisor builds it before it forks, so a
    warm command parses with it at once. Parsing leaves it as it was."""
    parser = argparse.ArgumentParser(
        prog="cowfs", description="A copy-on-write union filesystem in userspace.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cowfs {cowfs.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser(
        "mount", help="mount a layer stack", epilog=EXIT_CODES_HELP,
        usage="cowfs mount [OPTIONS] LOWER1[:LOWER2...] [UPPER] MERGED",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mount LOWER layers (leftmost on top, \\: escapes a colon) under an optional "
                    "writable UPPER at MERGED. Without UPPER the mount is read-only.")
    mount.add_argument("layers", nargs="+", metavar="PATHS",
                       help="the lower layers, then the upper layer if any, then the mount point")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                       help="comma-separated: nonempty, ro, fsname=NAME, workdir=DIR, userxattr "
                            "(write user.overlay.* xattrs, as unprivileged mounts do), "
                            "fsync=strict|batch|volatile (when changes reach the disk; "
                            "default batch), volatile (= fsync=volatile), the kernel's "
                            "metacopy=on|off, redirect_dir=on|follow|off|nofollow, index=on|off "
                            "(default on, on, on; metacopy=off,redirect_dir=off writes what a "
                            "default kernel overlay reads)")
    mount.add_argument("--workdir", metavar="DIR",
                       help="where changes are prepared, on the upper's filesystem "
                            "(default: .UPPER.cowfs-work beside UPPER)")
    mount.add_argument("-f", "--foreground", action="store_true",
                       help="serve in this process instead of a background daemon")
    mount.add_argument("--debug", action="store_true", help="log every request")
    mount.add_argument("--log-file", metavar="PATH",
                       help="where a background daemon logs (default: nowhere)")

    umount = commands.add_parser("umount", help="unmount a cowfs mount")
    umount.add_argument("mountpoint", metavar="MERGED")
    umount.add_argument("-l", "--lazy", action="store_true",
                        help="detach now, finish when no longer busy")

    run = commands.add_parser(
        "run", help="run a command in namespaces with a layer stack as its root",
        usage="cowfs run [OPTIONS] LOWER1[:LOWER2...] -- CMD [ARGS...]")
    run.add_argument("layers", metavar="LOWER1[:LOWER2...]")
    run.add_argument("--upper", metavar="DIR", help="keep changes here (default: thrown away)")
    run.add_argument("--rm", action="store_true", help="throw the changes away (the default)")
    run.add_argument("--commit", metavar="LAYER_DIR",
                     help="save the changes as a new layer directory, to stack on top later")
    run.add_argument("--hostname", default="cowfs")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--workdir", default="/", metavar="PATH", help="working directory inside")
    run.add_argument("--user", default="0:0", metavar="UID[:GID]")
    run.add_argument("--memory", metavar="SIZE", help="memory limit, e.g. 256M (no swap)")
    run.add_argument("--cpus", type=float, metavar="N", help="CPU time, e.g. 0.5 of one CPU")
    run.add_argument("--pids", type=int, metavar="N", help="at most N processes")
    run.add_argument("--cap-add", action="append", default=[], metavar="CAPABILITY",
                     help="a capability to keep beyond the default set (podman's), or ALL")
    run.add_argument("--cap-drop", action="append", default=[], metavar="CAPABILITY",
                     help="a capability of the default set to drop, or ALL")
    run.add_argument("--security-opt", action="append", default=[], metavar="OPTION",
                     help="seccomp=unconfined: run without the syscall filter; "
                          "unmask=ALL|PATH[:PATH...]: leave /proc and /sys paths as they are")
    run.add_argument("--userns", action="store_true",
                     help="root inside is an unprivileged host id (see --userns-ids)")
    run.add_argument("--userns-ids", metavar="FIRST:COUNT",
                     help=f"the host ids of the payload's 0..COUNT-1 (default {DEFAULT_USERNS}; "
                          "implies --userns)")
    run.add_argument("--net", choices=("none", "host"), default="none",
                     help="none: a network namespace with lo only (default); host: the host's")

    commands.add_parser("cleanup", help="remove what killed `cowfs run`s left behind")

    supervisor = commands.add_parser(
        "supervisor", help="the warm start of mount, umount and run",
        description="A process that has imported cowfs once and forks a process per command: "
                    "`cowfs mount` then costs milliseconds, not a Python start. Commands start "
                    "it when it is not running; `run` serves in the foreground (a service).")
    supervisor.add_argument("action", choices=("run", "start", "stop", "status"))

    listing = commands.add_parser(
        "list", help="the live cowfs mounts: layers, options, daemon, copy-up statistics",
        description="Every live cowfs mount of this mount namespace, whoever mounted it; the "
                    "details come from each mount's daemon (yours, or any as root).")
    listing.add_argument("--json", action="store_true", help="one JSON list")
    stats = commands.add_parser("stats", help="one live mount's layers, options and statistics")
    stats.add_argument("mountpoint", metavar="MERGED")
    stats.add_argument("--json", action="store_true", help="as JSON")
    refresh = commands.add_parser(
        "refresh", help="a lower layer changed behind the mount: see it as it is now",
        description="Drop what cowfs and the kernel cached of PATHs (paths in MERGED, or "
                    "relative to it; default everything), and of any file that changed "
                    "identity, so that the next access sees the lower layers as they are now.")
    refresh.add_argument("mountpoint", metavar="MERGED")
    refresh.add_argument("paths", nargs="*", metavar="PATH")

    demo = commands.add_parser("demo", help="mount the example image and show its layers")
    demo.add_argument("image", nargs="?", metavar="IMAGE_DIR",
                      help="a directory of layer directories (default: the repo's example)")
    add_oci_commands(commands)
    return parser, {"mount": mount, "umount": umount, "demo": demo, "run": run}


def add_oci_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """`cowfs layer import/export` and `cowfs image unpack`."""
    layer = commands.add_parser(
        "layer", help="OCI layer tars in and out of layer directories; the layers of a live mount")
    layer_commands = layer.add_subparsers(dest="layer_command", required=True, metavar="ACTION")
    add = layer_commands.add_parser(
        "add", help="put a directory in a live mount's lower layers",
        description="Every later lookup sees DIR as a lower layer of MERGED; the kernel forgets "
                    "what it cached.")
    add.add_argument("mountpoint", metavar="MERGED")
    add.add_argument("directory", metavar="DIR")
    where = add.add_mutually_exclusive_group()
    where.add_argument("--top", action="store_true", help="above every lower layer (default)")
    where.add_argument("--bottom", action="store_true", help="below every lower layer")
    where.add_argument("--above", metavar="LAYER", help="right above the lower layer LAYER")
    remove = layer_commands.add_parser(
        "remove", help="take a lower layer out of a live mount",
        description="Refused while a file open from LAYER, or a metacopy or redirect of the "
                    "upper, still needs it.")
    remove.add_argument("mountpoint", metavar="MERGED")
    remove.add_argument("layer", metavar="LAYER")
    import_ = layer_commands.add_parser(
        "import", help="a layer tar (.tar, .tar.gz, .tar.zst) as a new layer directory")
    import_.add_argument("tar", metavar="LAYER.tar")
    import_.add_argument("directory", metavar="DIR", help="must not exist, or be empty")
    import_.add_argument("--whiteouts", choices=("kernel", "oci"), default="kernel",
                         help="kernel: char 0/0 and overlay.opaque (default); oci: keep .wh.*")
    import_.add_argument("--userxattr", action="store_true",
                         help="mark opaque directories with user.overlay.* (not trusted.)")
    export = layer_commands.add_parser(
        "export", help="the changes in an upper directory as a layer tar")
    export.add_argument("upper", metavar="UPPER")
    export.add_argument("-o", "--output", required=True, metavar="LAYER.tar",
                        help=".gz or .zst endings compress")
    export.add_argument("--lowers", metavar="L1:L2",
                        help="the lower layers, top first: needed for renamed directories "
                             "and metadata-only copies")
    export.add_argument("--userxattr", action="store_true",
                        help="the upper's markers are user.overlay.* (not trusted.)")
    image = commands.add_parser("image", help="container images as layer directories")
    image_commands = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    unpack = image_commands.add_parser(
        "unpack", help="an OCI layout or docker save tarball as layer directories; "
                       "prints the lowerdir string")
    unpack.add_argument("image", metavar="PATH")
    unpack.add_argument("destination", metavar="DEST")
    unpack.add_argument("--ref", metavar="TAG|DIGEST", help="which image, when several")
    unpack.add_argument("--whiteouts", choices=("kernel", "oci"), default="kernel")


def command_oci(arguments: argparse.Namespace) -> int:
    from cowfs import ociimage, ocilayer
    try:
        if arguments.command == "image":
            result = ociimage.unpack_image(
                arguments.image, arguments.destination, ref=arguments.ref,
                whiteouts=arguments.whiteouts,
                progress=lambda line: print(line, file=sys.stderr, flush=True))
            print(result.lowerdir)
        elif arguments.layer_command == "import":
            prefix = "user.overlay." if arguments.userxattr else None
            ocilayer.import_layer(arguments.tar, arguments.directory,
                                  whiteouts=arguments.whiteouts, xattr_prefix=prefix)
        else:
            lowers = parse_lowerdirs(arguments.lowers) if arguments.lowers else None
            ocilayer.export_layer(arguments.upper, arguments.output, lowers=lowers,
                                  userxattr=arguments.userxattr,
                                  compression=ocilayer.compression_for(arguments.output))
    except (ocilayer.LayerError, ociimage.ImageError) as exc:
        raise CliError(str(exc)) from None
    return EXIT_OK


def command_live(arguments: argparse.Namespace) -> int:
    """`cowfs list`, `stats`, `refresh` and `layer add/remove`: ask live mounts' daemons."""
    import json

    from cowfs import control
    try:
        if arguments.command == "list":
            described = control.describe_all()
            if arguments.json:
                print(json.dumps(described, indent=2))
            else:
                for description in described:
                    print(format_mount(description))
            return EXIT_OK
        mount = control.find_mount(arguments.mountpoint)
        if arguments.command == "stats":
            description = control.describe(mount)
            print(json.dumps(description, indent=2) if arguments.json
                  else format_mount(description))
            return EXIT_OK
        if arguments.command == "refresh":
            paths = [control.relative_path(mount, path) for path in arguments.paths]
            result = control.request(mount, {"command": "refresh", "paths": paths or None})
            print(f"refreshed {mount.mountpoint}: the kernel knew {result['nodes']} files, "
                  f"{result['changed']} changed identity, {result['invalidated']} cached "
                  "entries dropped")
            return EXIT_OK
        if arguments.layer_command == "add":
            position = "bottom" if arguments.bottom else "above" if arguments.above else "top"
            message = {"command": "add_layer", "path": os.path.realpath(arguments.directory),
                       "position": position}
            if arguments.above:
                message["anchor"] = os.path.realpath(arguments.above)
            control.request(mount, message)
            print(f"added lower layer {arguments.directory} to {mount.mountpoint}")
            return EXIT_OK
        control.request(mount, {"command": "remove_layer",
                                "path": os.path.realpath(arguments.layer)})
        print(f"removed lower layer {arguments.layer} from {mount.mountpoint}")
        return EXIT_OK
    except control.ControlError as exc:
        raise CliError(str(exc), EXIT_MOUNT_FAILED if arguments.command != "list"
                       else EXIT_UNEXPECTED) from None


def format_mount(description: dict[str, object]) -> str:
    """A live mount in words, as `cowfs list` and `cowfs stats` print it."""
    if "error" in description:
        return f"{description['merged']}: {description['error']}"
    statistics = description["statistics"]
    assert isinstance(statistics, dict)
    lowers = description["lowers"]
    assert isinstance(lowers, list)
    options = description["options"]
    assert isinstance(options, list)
    requests = statistics.get("requests", {})
    lines = [f"{description['merged']} (daemon pid {description['pid']})",
             f"  upper:    {description['upper'] or '(none: read-only)'}",
             f"  workdir:  {description['workdir'] or '-'}",
             f"  lowers:   {lowers[0]}", *(f"            {lower}" for lower in lowers[1:]),
             f"  options:  {','.join(options)}"]
    if "copy_ups" in statistics:
        lines.append(f"  copy-ups: {statistics['copy_ups']} ({statistics['directories']} "
                     f"directories, {statistics['metadata_only']} metadata only), "
                     f"{statistics['data_copies']} data copies of "
                     f"{statistics['data_bytes']} bytes ({statistics['reflinks']} reflinks), "
                     f"{statistics['seconds']:.3f} s")
    lines.append(f"  kernel:   {statistics['nodes']} files known, {statistics['open_files']} "
                 f"open, {sum(requests.values()) if isinstance(requests, dict) else 0} "
                 "requests served")
    return "\n".join(lines)


def command_supervisor(action: str) -> int:
    from cowfs import client, supervisor
    path = client.socket_path()
    if path is None:
        raise CliError("no runtime directory for the supervisor: set XDG_RUNTIME_DIR "
                       "(or COWFS_RUNTIME_DIR)")
    if action == "run":
        if not supervisor.serve(path):
            raise CliError(f"a supervisor serves {path} already")
        return EXIT_OK
    if action == "start":
        if supervisor.request_to(path, {"command": "status"}) is None \
                and not client.start_supervisor(path):
            raise CliError(f"the supervisor did not start at {path}", EXIT_UNEXPECTED)
        action = "status"
    status = supervisor.request_to(path, {"command": action})
    if status is None:
        print(f"no supervisor at {path}")
        return EXIT_OK if action == "stop" else 3
    if action == "stop":
        print(f"stopped the supervisor (pid {status['stopped']})")
    else:
        print(f"supervisor pid {status['pid']} at {path}: {status['requests']} commands "
              f"served, {status['running']} running")
    return EXIT_OK


def command_cleanup() -> int:
    for path in sweep_leftovers():
        print(f"removed {path}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except CliError as exc:
        print(f"cowfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except LayoutError as exc:
        print(f"cowfs: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _dispatch(argv: list[str]) -> int:
    parser, commands = build_parser()
    if argv and argv[0] == "run":
        if "--" not in argv:
            if {"-h", "--help"} & set(argv[1:]):
                commands["run"].parse_args(["--help"])
            commands["run"].error("the command to run follows --")
        split = argv.index("--")
        arguments = commands["run"].parse_args(argv[1:split])
        arguments.command, arguments.payload = "run", argv[split + 1:]
        if not arguments.payload:
            commands["run"].error("no command after --")
    elif argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version"):
        return command_mount_program(argv)
    elif argv and argv[0] in commands:
        # Options may stand anywhere, also after the layers (`mount L M -o ro`).
        arguments = commands[argv[0]].parse_intermixed_args(argv[1:])
        arguments.command = argv[0]
    else:
        arguments = parser.parse_args(argv)
    if arguments.command == "mount":
        return command_mount(arguments)
    if arguments.command == "umount":
        return command_umount(arguments.mountpoint, lazy=arguments.lazy)
    if arguments.command == "run":
        return command_run(arguments)
    if arguments.command == "cleanup":
        return command_cleanup()
    if arguments.command == "supervisor":
        return command_supervisor(arguments.action)
    if arguments.command in ("list", "stats", "refresh") or (
            arguments.command == "layer" and arguments.layer_command in ("add", "remove")):
        return command_live(arguments)
    if arguments.command in ("layer", "image"):
        return command_oci(arguments)
    from cowfs import demo
    return demo.run(arguments.image)


def command_mount(arguments: argparse.Namespace) -> int:
    """`cowfs mount LOWERS [UPPER] MERGED`: the layers as arguments, options as `-o`."""
    parsed = _parse_options(arguments.options)
    paths = arguments.layers
    if len(paths) not in (2, 3):
        raise CliError("expected LOWER1[:LOWER2...] [UPPER] MERGED")
    if parsed.lowerdir or parsed.upperdir:
        raise CliError("lowerdir= and upperdir= go with the `cowfs -o ... MERGED` form; "
                       "here the layers are arguments")
    parsed.lowerdir = paths[0]
    parsed.upperdir = paths[1] if len(paths) == 3 else None
    parsed.workdir = arguments.workdir or parsed.workdir
    return mount_parsed(parsed, paths[-1], foreground=arguments.foreground,
                        debug=arguments.debug, log_file=arguments.log_file)


def command_mount_program(argv: Sequence[str]) -> int:
    """`cowfs [-f] [-d] -o lowerdir=L1:L2,upperdir=U,workdir=W[,...] [SOURCE] MERGED`.

    The form fuse-overlayfs takes, which containers-storage (`mount_program`) and mount.fuse3
    (`mount -t fuse.cowfs SOURCE MERGED -o ...`) use. SOURCE is only a name for `mount`.
    """
    parser = argparse.ArgumentParser(
        prog="cowfs", usage="cowfs [-f] [-d] -o lowerdir=DIRS[,upperdir=DIR,workdir=DIR,...] "
                            "[SOURCE] MERGED")
    parser.add_argument("-o", dest="options", action="append", default=[])
    parser.add_argument("-f", "--foreground", action="store_true")
    parser.add_argument("-d", "--debug", action="store_true")
    parser.add_argument("-s", action="store_true", help="single-threaded (always)")
    parser.add_argument("paths", nargs="+", metavar="[SOURCE] MERGED")
    arguments = parser.parse_intermixed_args(argv)
    if len(arguments.paths) > 2:
        raise CliError("expected [SOURCE] MERGED after the options")
    parsed = _parse_options(arguments.options)
    if not parsed.lowerdir:
        raise CliError("missing mount option lowerdir=DIRS")
    if parsed.workdir and not parsed.upperdir:
        raise CliError("workdir= needs upperdir=")
    if len(arguments.paths) == 2 and parsed.mount.fsname == "cowfs":
        parsed.mount.fsname = arguments.paths[0]
    return mount_parsed(parsed, arguments.paths[-1], foreground=arguments.foreground,
                        debug=arguments.debug or parsed.debug, log_file=None)


def _parse_options(values: Sequence[str]) -> options.ParsedOptions:
    try:
        return options.parse(values, is_root=os.geteuid() == 0)
    except options.OptionError as exc:
        raise CliError(str(exc)) from None


def mount_parsed(parsed: options.ParsedOptions, mountpoint: str, *, foreground: bool,
                 debug: bool, log_file: str | None) -> int:
    assert parsed.lowerdir is not None
    from cowfs import fuse_extensions
    if not parsed.mount.kernel_caches and fuse_extensions.loaded():
        raise FreshProcessNeeded
    lowers = parse_lowerdirs(parsed.lowerdir)
    if parsed.workdir is not None and parsed.upperdir is None:
        raise CliError("a workdir needs an upper layer")
    configure_logging(debug=debug or parsed.debug)
    for item in parsed.ignored:
        log.debug("option %s ignored", item)
    stack = open_stack(lowers, parsed.upperdir, parsed.workdir, userxattr=parsed.userxattr,
                       mountpoint=mountpoint, nonempty=parsed.nonempty,
                       format_options=parsed.format)
    mountpoint = os.path.realpath(mountpoint)
    if parsed.upperdir is None:
        parsed.mount.readonly = True
    return start_daemon(stack, mountpoint, parsed.mount, foreground=foreground,
                        log_file=log_file)


def configure_logging(*, debug: bool) -> None:
    """Log to stderr: a background daemon's stderr becomes its --log-file once mounted."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(name)s: %(message)s" if debug else "cowfs: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        logging.disable(logging.DEBUG)   # a debug call per request then costs next to nothing


def start_daemon(stack: LayerStack, mountpoint: str, mount_options: daemon.MountOptions, *,
                 foreground: bool, log_file: str | None) -> int:
    """Mount; in the background, return only once the mount is live (or has failed)."""
    if foreground:
        daemon.serve(stack, mountpoint, mount_options)
        return EXIT_OK
    try:
        daemon.start(stack, mountpoint, mount_options, log_file=log_file)
    except daemon.DaemonError as exc:
        raise CliError(f"cannot mount {mountpoint}: {exc}", EXIT_MOUNT_FAILED) from None
    return EXIT_OK


def command_umount(mountpoint: str, *, lazy: bool = False) -> int:
    resolved = os.path.realpath(mountpoint)
    if not any(mount.mountpoint == resolved and mount.fstype == "fuse.cowfs"
               for mount in read_mountinfo()):
        raise CliError(f"{mountpoint} is not a cowfs mount")
    try:
        unmount(resolved, lazy=lazy)
    except OSError as exc:
        raise CliError(f"cannot unmount {mountpoint}: {exc}", EXIT_MOUNT_FAILED) from None
    return EXIT_OK


def _parse_user(text: str) -> tuple[int, int]:
    uid, _, gid = text.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        raise CliError(f"--user expects UID[:GID] as numbers, not {text!r}") from None


class _Interrupted(Exception):
    """A signal before the payload runs: tear down what was set up, exit 128+n."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, _frame: object) -> None:
    raise _Interrupted(signum)


RUN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def command_run(arguments: argparse.Namespace) -> int:
    """Mount the stack on a scratch upper (or --upper), run the payload inside, tear down.

    Until the payload runs, a signal tears down what exists and exits 128+n; then signals are
    forwarded to it; teardown itself is not cut short.
    """
    for signum in RUN_SIGNALS:
        signal.signal(signum, _interrupt)
    try:
        return _run(arguments)
    except _Interrupted as interrupted:
        return 128 + interrupted.signum
    except SandboxError as exc:
        raise CliError(str(exc), exc.exit_code) from None


def _run(arguments: argparse.Namespace) -> int:
    uid, gid = _parse_user(arguments.user)
    environment = {}
    for item in arguments.env:
        key, has_value, value = item.partition("=")
        if not key or not has_value:
            raise CliError(f"--env expects KEY=VALUE, not {item!r}")
        environment[key] = value
    if arguments.commit and os.path.lexists(arguments.commit):
        raise CliError(f"--commit: layer directory {arguments.commit} exists already")
    seccomp, unmask = _parse_security_options(arguments.security_opt)
    userns = None
    if arguments.userns or arguments.userns_ids:
        userns = _parse_userns(arguments.userns_ids or DEFAULT_USERNS)
    check_run_options(arguments.cap_add, arguments.cap_drop, unmask, (uid, gid), userns)
    with Sandbox(arguments.layers, upper=arguments.upper, memory=arguments.memory,
                 cpus=arguments.cpus, pids=arguments.pids, userns=userns) as box:
        try:
            code = box.run(arguments.payload, hostname=arguments.hostname, env=environment,
                           workdir=arguments.workdir, user=(uid, gid), network=arguments.net,
                           cap_add=arguments.cap_add, cap_drop=arguments.cap_drop,
                           seccomp=seccomp, unmask=unmask, on_start=_forward_signals)
        finally:
            for signum in RUN_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
        if box.oom_killed:
            print(f"cowfs run: out of memory: the memory limit ({arguments.memory}) killed a "
                  "process of the payload", file=sys.stderr)
        if arguments.commit:
            box.commit(arguments.commit)
        return code


def _parse_security_options(options: list[str]) -> tuple[bool, list[str]]:
    """(whether the syscall filter is on, the paths to unmask) from podman's `--security-opt`
    spellings."""
    seccomp, unmask = True, []
    for option in options:
        key, _, value = option.partition("=")
        if key == "seccomp" and value in ("unconfined", "default"):
            seccomp = value == "default"
        elif key == "unmask" and value:
            unmask += value.split(":")
        else:
            raise CliError(f"--security-opt: expected seccomp=unconfined, seccomp=default or "
                           f"unmask=ALL|PATH[:PATH...], not {option!r}")
    return seccomp, unmask


def _parse_userns(text: str) -> tuple[int, int]:
    first, _, count = text.partition(":")
    if not first.isdigit() or not count.isdigit():
        raise CliError(f"--userns-ids expects FIRST:COUNT, not {text!r}")
    return int(first), int(count)


def _forward_signals(helper: int) -> None:
    for signum in RUN_SIGNALS:
        signal.signal(signum, lambda signum, _frame: _send(helper, signum))


def _send(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
