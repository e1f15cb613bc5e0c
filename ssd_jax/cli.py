"""The command-line layer shared by every `experiments` command (and its `ssd-*` console script).

`run(main, ...)` wraps `absl.app.run`:

* ``--config=NAME`` (a file of the commands' config folder, e.g. ``ssd300_voc``) or
  ``--config=PATH.py``, then ``--config.a.b=VALUE`` overrides, are parsed here, not by
  ml_collections' flag (which parses the command line while flags are being defined, so a typo
  ended in a traceback before any command code ran). An unknown field names the closest known
  one; a value of the wrong type names the type.
* ``--print_config`` prints the config's fields with the comment each config file gives them.
* ``--help`` exits 0 (absl exits 1).
* A `ssd_jax.errors.UserError` (and a missing file, a folder that is a file, no permission)
  becomes ``error: <message>`` and exit status 1; Ctrl-C becomes one line (exit 130). With
  ``--debug`` or ``SSD_JAX_DEBUG=1`` the traceback is shown instead.
* TensorFlow's C++ INFO/WARNING banners are silenced (``TF_CPP_MIN_LOG_LEVEL=2``, unless set).

Over 500 lines on purpose: the command layer in one place (flags, config files and overrides,
--print_config, error messages); nothing in the library imports it.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

from ssd_jax.errors import ConfigError, LostProcessError, UserError
from ssd_jax.host import keep_freed_memory, prefer_eigen_convolutions

FLAGS = flags.FLAGS

#: Exceptions shown as a short message: the user's mistakes, not bugs.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               FileExistsError)
_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _debug_requested(argv: Sequence[str]) -> bool:
    return os.environ.get("SSD_JAX_DEBUG", "") not in ("", "0") or "--debug" in argv


# ----------------------------------------------------------------------------- config files


def config_names(configs_dir: str) -> list[str]:
    """The config names of a folder: its `*.py` files that define `get_config`."""
    if not os.path.isdir(configs_dir):
        return []
    out = []
    for f in sorted(os.listdir(configs_dir)):
        if f.endswith(".py") and not f.startswith("_"):
            with open(os.path.join(configs_dir, f)) as fh:
                if "def get_config" in fh.read():
                    out.append(f[:-3])
    return out


def resolve_config(spec: str, configs_dir: str | None) -> str:
    """The file of ``--config=spec``: a path to a .py file, or a name from `configs_dir`."""
    if os.path.isfile(spec):
        return os.path.abspath(spec)
    if configs_dir and re.fullmatch(r"\w+", spec):
        path = os.path.join(configs_dir, spec + ".py")
        if os.path.isfile(path):
            return path
    known = ", ".join(config_names(configs_dir)) if configs_dir else ""
    hint = f" Known names: {known}." if known else ""
    raise ConfigError(f"--config={spec}: no such file and no config of that name.{hint}")


def load_config_file(path: str) -> Any:
    """`get_config()` of the Python file at `path` (a ConfigDict)."""
    name = "ssd_jax_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"--config={path}: syntax error at line {e.lineno}: {e.msg}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config={path}: the file defines no get_config()")
    return module.get_config()


def field_paths(config: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf field of a ConfigDict (groups recursed into)."""
    out = []
    for key in config.keys():
        value = config[key]
        path = f"{prefix}{key}"
        if hasattr(value, "keys") and callable(value.keys):
            out += field_paths(value, path + ".")
        else:
            out.append(path)
    return out


def _suggest(dotted: str, config: Any) -> str:
    paths = field_paths(config)
    leaf = dotted.split(".")[-1]
    same_leaf = [p for p in paths if p.split(".")[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(dotted, paths, n=1, cutoff=0.6) or \
        [p for p in paths if p.split(".")[-1] in difflib.get_close_matches(
            leaf, [q.split(".")[-1] for q in paths], n=1, cutoff=0.7)][:1]
    return f"; did you mean --config.{close[0]}?" if close else ""


def parse_value(text: str, current: Any, field: str) -> Any:
    """`text` from the command line as a value of the type of `current` (the field's value)."""
    what = f"--config.{field}={text}"
    if isinstance(current, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{what}: config.{field} is a boolean (true or false)")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                value = None
            if value is not None and value.is_integer():
                return int(value)
            raise ConfigError(f"{what}: config.{field} is an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{what}: config.{field} is a number") from None
    if isinstance(current, tuple | list):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, tuple | list):
            items = [t.strip() for t in text.split(",") if t.strip()] if text.strip() else []
            try:
                if len(current):
                    kind = type(current[0])
                    value = [kind(t) for t in items]
                else:  # no element to copy the type from: numbers as numbers, else text
                    kind = str
                    value = [_literal_or_text(t) for t in items]
            except ValueError:
                raise ConfigError(f"{what}: config.{field} is a list of {kind.__name__}, e.g. "
                                  f"a,b or (1, 2)") from None
        return type(current)(value)
    if isinstance(current, str) or current is None:
        return text
    raise ConfigError(f"{what}: config.{field} cannot be set from the command line")


def _literal_or_text(text: str) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, int | float) else text


def apply_override(config: Any, dotted: str, text: str) -> None:
    """Set ``config.<dotted>`` from command-line `text`; ConfigError for an unknown field."""
    parts = dotted.split(".")
    node = config
    for i, part in enumerate(parts):
        if not (hasattr(node, "keys") and part in node.keys()):
            where = "config" + "".join("." + p for p in parts[:i])
            raise ConfigError(f"--config.{dotted}: {where} has no field {part!r}"
                              f"{_suggest(dotted, config)} (--print_config lists the fields)")
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if hasattr(current, "keys"):
        raise ConfigError(f"--config.{dotted}: config.{dotted} is a group of fields; set one of "
                          f"them, e.g. --config.{dotted}.{next(iter(current.keys()), 'x')}=...")
    value = parse_value(text, current, dotted)
    with config.unlocked():
        node[parts[-1]] = value


def split_config_args(argv: Sequence[str]) -> tuple[list[str], str | None, list[tuple[str, str]]]:
    """(the other args, the --config value or None, [(field, text)] of --config.<field> args)."""
    rest, spec, overrides = [], None, []
    i = 0
    args = list(argv)
    while i < len(args):
        a = args[i]
        if a == "--":
            rest += args[i:]
            break
        m = re.fullmatch(r"--config(\.[\w.]+)?(?:=(.*))?", a, flags=re.S)
        if m is None:
            rest.append(a)
            i += 1
            continue
        value = m.group(2)
        if value is None:
            if i + 1 >= len(args):
                raise ConfigError(f"{a} needs a value ({a}=VALUE)")
            value = args[i + 1]
            i += 1
        if m.group(1):
            overrides.append((m.group(1)[1:], value))
        else:
            spec = value
        i += 1
    return rest, spec, overrides


def config_comments(*paths: str) -> dict[str, str]:
    """{dotted field: comment} from ``config.a.b = ...  # comment`` lines of config files (an
    inline comment, else the comment block right above); the first file that comments a field
    wins."""
    out: dict[str, str] = {}
    for path in paths:
        if not path or not os.path.isfile(path):
            continue
        with open(path) as f:
            lines = f.read().splitlines()
        above: list[str] = []
        continued = -1  # lines up to here continue an inline comment: not a block above
        for i, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith("#"):
                if i > continued:
                    above.append(stripped.lstrip("#").strip())
                continue
            m = re.match(r"\s*config((?:\.\w+)+)\s*=[^#]*?(?:#\s*(.*))?$", line)
            if m:
                field = m.group(1)[1:]
                comment = (m.group(2) or "").strip()
                j = i + 1  # an inline comment continued on the following comment-only lines
                while comment and j < len(lines) and lines[j].strip().startswith("#") and \
                        lines[j].index("#") > len(line) - len(line.lstrip()):
                    comment += " " + lines[j].strip().lstrip("#").strip()
                    j += 1
                continued = j - 1
                if not comment and above:
                    comment = " ".join(above)
                if comment and field not in out:
                    out[field] = comment
            above = []
    return out


def format_config(config: Any, comments: dict[str, str]) -> str:
    """Every field as ``name = value  # comment``, one per line, groups in declaration order."""
    lines = []
    for path in field_paths(config):
        node = config
        for p in path.split("."):
            node = node[p]
        text = f"{path} = {node!r}"
        comment = comments.get(path)
        lines.append(f"{text:<48}  # {comment}" if comment else text)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running


#: Defined by `define_predictor_flags`; a command declares them key flags (listed by its --help).
PREDICTOR_FLAGS = ("workdir", "step", "torchvision_checkpoint", "dtype")


def define_predictor_flags() -> None:
    """The flags that choose the model of predict and export (`inference.load_predictor`'s
    arguments): --workdir [--step] or --torchvision_checkpoint, and --dtype. The calling command
    then declares PREDICTOR_FLAGS key flags, so that its --help lists them."""
    flags.DEFINE_string("workdir", None, "Training workdir (run_info.json + checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
    flags.DEFINE_string("torchvision_checkpoint", None, "A torchvision ssd300_vgg16 or "
                        "ssdlite320_mobilenet_v3_large state dict (.pth/.pt/.safetensors; "
                        "recognized from its keys), converted on the fly (instead of --workdir).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                      "Compute dtype (default: the run's config.dtype; float32 for torchvision).")


def parse_flags(fv: flags.FlagValues, program: str, argv: Sequence[str]) -> None:
    """Parse command-line flags `argv` (no program name) into `fv`, a FlagValues of a command's
    own, for calling the command from Python; a bad flag or a stray argument is a UserError."""
    try:
        rest = fv([program, *argv])
    except flags.Error as e:
        raise UserError(f"{e} (--help lists the flags)") from None
    if len(rest) > 1:
        raise UserError(f"unexpected arguments: {' '.join(rest[1:])}")

#: libraries whose INFO lines stay off the console (a training run keeps them in WORKDIR/train.log):
#: orbax writes ~45 per checkpoint, clu's logging writer repeats every scalar of the progress line,
#: jax reports the TPU backend it did not find.
QUIET_LOGGERS = ("/orbax/", "/clu/metric_writers/", "/jax/_src/xla_bridge.py")


class _QuietLibraries:
    """A logging filter: records below WARNING from QUIET_LOGGERS' files are dropped."""

    def filter(self, record) -> bool:
        import logging as py_logging

        if record.levelno >= py_logging.WARNING:
            return True
        path = (record.pathname or "").replace(os.sep, "/")
        return not any(q in path for q in QUIET_LOGGERS)


def quiet_console() -> None:
    """Keep library INFO chatter (QUIET_LOGGERS) out of absl's console handler."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
        handler.addFilter(_QuietLibraries())


def import_tensorflow_quietly() -> None:
    """Import TensorFlow (GPUs hidden: `ssd_jax.data.tf_compat`) with its C++ start-up banners
    dropped: oneDNN notices written before its logging is initialized, which
    TF_CPP_MIN_LOG_LEVEL does not silence. For the commands only: file descriptor 2 points at a
    temporary file for the import's seconds, which would swallow what other threads write to
    stderr meanwhile. With SSD_JAX_DEBUG set, or TensorFlow already imported, a plain import; if
    the import fails, what it printed is shown."""
    import tempfile

    if "tensorflow" in sys.modules or os.environ.get("SSD_JAX_DEBUG", "") not in ("", "0"):
        from ssd_jax.data import tf_compat  # noqa: F401
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            from ssd_jax.data import tf_compat  # noqa: F401
        except BaseException:  # the import failed: what it printed is the explanation
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def run(main: Callable[..., Any], *, configs_dir: str | None = None,
        default_config: str | None = None, argv: Sequence[str] | None = None,
        run_config: Callable[[], Any] | None = None) -> None:
    """`absl.app.run(main)` with the behaviour of the module docstring.

    With `configs_dir`, the command takes ``--config`` (default `default_config`, a name or None
    for "no config") and `main(argv, config)` receives the loaded ConfigDict (or None); else
    `main(argv)`. `run_config` (commands that read a run, default_config None): called after the
    flags are parsed, it returns the run's own config, which `--config.FIELD=VALUE` without
    `--config` then overrides (main receives it; without overrides None) and `--print_config`
    prints.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    keep_freed_memory()
    prefer_eigen_convolutions()
    argv = list(sys.argv if argv is None else argv)
    debug = _debug_requested(argv)
    if "debug" not in FLAGS:
        flags.DEFINE_boolean("debug", False, "Show the traceback of an error (also SSD_JAX_DEBUG=1).")
    if configs_dir is not None and "config" not in FLAGS:
        names = ", ".join(config_names(configs_dir))
        flags.DEFINE_string("config", default_config,
                            f"A config name ({names}) or a .py file with get_config(); override "
                            "fields with --config.FIELD=VALUE (see --print_config).")
        flags.DEFINE_boolean("print_config", False,
                             "Print the config's fields (after overrides) with their comments, "
                             "then exit.")
    # --help lists the flags of the program absl sees as main (argv[0]): the command's own flags,
    # also when it runs as a console script (ssd-train), and the flags defined here
    command = sys.modules.get(main.__module__)
    names = ["config", "print_config", "debug"]
    if main.__module__ != "__main__":
        names += [f.name for f in FLAGS.get_key_flags_for_module(main.__module__)]
        main_module = sys.modules.get("__main__")
        if main_module is not None and command is not None and command.__doc__:
            main_module.__doc__ = command.__doc__  # absl's usage text is __main__'s docstring
    for name in names:
        if name in FLAGS:
            FLAGS.register_key_flag_for_module(argv[0], FLAGS[name])
    loaded: dict[str, Any] = {}
    debug_flag = {"on": debug}

    def fail(message: str, code: int = 1):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(code)

    def parser(args: list[str]) -> list[str]:
        try:
            rest, spec, overrides = split_config_args(args) if configs_dir is not None else (
                args, None, [])
        except ConfigError as e:
            fail(str(e), 2)
        rest = ["--help" if a == "-h" else a for a in rest]  # absl knows --help and -?, not -h
        help_asked = any(a in _HELP for a in rest)
        try:
            remaining = FLAGS(rest)
        except SystemExit:
            if help_asked:
                if configs_dir is not None:
                    print("\nConfig fields: --print_config lists them with their comments "
                          "(with --config=NAME, that config's).")
                raise SystemExit(0) from None
            raise
        except flags.Error as e:
            hint = _unknown_flag_hint(e, spec if spec is not None else default_config, configs_dir)
            if hint:  # absl's own guess (num_processes for num_train_steps) would mislead
                fail(f"unknown flag --{e.flagname}{hint}", 2)
            fail(f"{e} (--help lists the flags)", 2)
        debug_flag["on"] = debug or bool(FLAGS.debug)
        if configs_dir is None:
            return remaining
        spec = spec if spec is not None else FLAGS.config
        from ssd_jax import config as config_lib

        # the schema's comments (ssd_jax/config.py) say what each field does; a config file's
        # own comments on a field it changes come first
        default_path = config_lib.__file__
        others = [os.path.join(configs_dir, n + ".py") for n in config_names(configs_dir)]
        if spec is None and not ((overrides or FLAGS.print_config) and run_config is not None):
            if overrides:
                fail(f"--config.{overrides[0][0]} given without --config", 2)
            if FLAGS.print_config:
                print("no config: this command uses the run's own unless --config=NAME is given")
                sys.exit(0)
            loaded["config"] = None
            return remaining
        try:  # a config file, or the run's own config (run_config), overridden field by field
            if spec is None:
                path, header, config = None, "the run's config (run_info.json), after overrides", \
                    run_config()
            else:
                path = resolve_config(spec, configs_dir)
                header, config = path, load_config_file(path)
            for field, text in overrides:
                apply_override(config, field, text)
        except USER_ERRORS as e:
            if debug:
                raise
            fail(_message(e), 2)
        if path is not None:
            FLAGS.config = path
        if FLAGS.print_config:
            comments = config_comments(*([path] if path else []), default_path, *others)
            print(f"# {header}\n" + format_config(config, comments))
            sys.exit(0)
        loaded["config"] = config
        return remaining

    def wrapped(args: list[str]) -> Any:
        quiet_console()
        try:
            return main(args, loaded["config"]) if configs_dir is not None else main(args)
        except KeyboardInterrupt as e:
            if debug_flag["on"]:
                raise
            message = str(e) if str(e) else "interrupted"
            print(f"\n{message}", file=sys.stderr)
            # the shell's code for death by that signal: 130 after Ctrl-C, 143 after SIGTERM
            sys.exit(143 if getattr(e, "signal_name", "") == "SIGTERM" else 130)
        except LostProcessError as e:
            if debug_flag["on"]:
                raise
            from ssd_jax.distributed import exit_lost

            exit_lost(str(e))  # at once: an orderly exit would wait for the lost process
        except USER_ERRORS as e:
            if debug_flag["on"]:
                raise
            fail(_message(e))
        except OSError as e:  # a path the user named (read-only, full disk, ...): not a bug
            if debug_flag["on"] or e.filename is None:
                raise
            fail(_message(e))

    try:
        app.run(wrapped, argv=argv, flags_parser=parser)
    except BrokenPipeError:
        # the reader went away (`--help | head -1`): stop quietly, as a pipeline expects; output
        # still buffered would fail again at exit, so stdout points at /dev/null from here on
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)  # the shell's code for death by SIGPIPE


def _unknown_flag_hint(e: flags.Error, config_spec: str | None, configs_dir: str | None) -> str:
    """For `--batch_size=4`: '; it is a config field: --config.batch_size=...' when the unknown
    flag names a field of the config in use (else "")."""
    name = getattr(e, "flagname", None)
    if not name or configs_dir is None or config_spec is None:
        return ""
    try:
        config = load_config_file(resolve_config(config_spec, configs_dir))
    except Exception:  # noqa: BLE001 (only a hint: the config's own errors come later)
        return ""
    paths = [p for p in field_paths(config) if p == name or p.endswith("." + name)]
    return f"; it is a config field: --config.{paths[0]}=..." if paths else ""


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and not isinstance(e, UserError):
        what = {FileNotFoundError: "not found", NotADirectoryError: "a path component is a file",
                IsADirectoryError: "is a folder, not a file", PermissionError: "permission denied",
                FileExistsError: "already exists"}.get(type(e), e.strerror)
        return f"{e.filename}: {what}"
    text = str(e)
    name = getattr(e, "parameter", None)
    flag = _FLAG_OF_PARAMETER.get(name, name)
    if name and flag in FLAGS and text.startswith(name):
        return f"--{flag}{text[len(name):]}"  # the library's parameter is this command's flag
    return text


#: library parameters whose command-line flag has another name
_FLAG_OF_PARAMETER = {"out_dir": "out", "formats": "format"}
