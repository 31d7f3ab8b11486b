"""The run skeleton every workflow shares: one table entry per command, one way to parse, own and end a run.

A workflow declares a ``Workflow``: its command name, its default config (shipped with the package), its config
sections and how each is parsed, its own command-line arguments, the function that does the work and the line it
prints at the end. From that one entry the CLI gets the subcommand with the common arguments (``--config``,
``--out``, ``--overwrite``, ``--resume``, ``--print-config``, ``key=value`` overrides), the config is parsed before
any work (unknown sections and keys refused), and the run's output folder follows one set of rules
(``start_run``). A run stopped by SIGTERM returns ``{"preempted": True, ...}`` and the CLI says how to resume.

Multi-host: every process runs the same command. Only process 0 prepares the output folder and writes the
resolved config (the others wait for it), and the workflows write reports, images and exports from process 0
only (``train.distributed.is_writer``); Orbax coordinates the checkpoints.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from persguard_jax import config as cfglib
from persguard_jax.io import check_creatable

# Loop defaults of the small runs (world pre-training, world CLIP): a config's ``loop`` section overrides them.
SMALL_RUN_LOOP = {"log_every": 25, "checkpoint_every": 250, "max_to_keep": 1, "tensorboard": False}

SectionParser = Callable[[Mapping[str, Any]], Any]


def optional(parser: SectionParser) -> SectionParser:
    """A section that may be absent or ``null`` (then None), e.g. ``lora``."""
    def parse(d: Mapping[str, Any]) -> Any:
        return parser(d) if d else None
    return parse


def mapping(d: Mapping[str, Any]) -> dict:
    """A free-form section (read by the workflow itself, e.g. model sizes)."""
    return dict(d)


def checked(check: Callable[[dict], Any]) -> SectionParser:
    """A section kept as a mapping (the workflow completes it at run time) but checked now by ``check``, so a
    bad value fails before any work."""
    def parse(d: Mapping[str, Any]) -> dict:
        check(dict(d))
        return dict(d)
    return parse


def small_run_loop(d: Mapping[str, Any]) -> dict:
    """The ``loop`` section of a small run: checked as a ``LoopConfig`` over ``SMALL_RUN_LOOP`` (its length
    comes from the stage, ``loop_config``)."""
    return checked(lambda s: loop_config(s, 1))(d)


class Config:
    """A workflow's config, parsed: each section as an attribute, and ``raw``, the YAML mapping it came from."""

    def __init__(self, raw: dict, sections: Mapping[str, Any]):
        self.raw, self._sections = raw, dict(sections)

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("_sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"config has no section {name!r}; sections: {sorted(sections)}")

    def get(self, name: str, default: Any = None) -> Any:
        """Section ``name``, or ``default`` when the workflow has no such section."""
        return self._sections.get(name, default)

    def resolved(self) -> dict:
        """Every section with its defaults filled in (what ``--print-config`` prints)."""
        return {name: _plain(value) for name, value in self._sections.items()}


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def check_sections(raw: Mapping[str, Any], known: Iterable[str]) -> None:
    """Fail on a top-level config section the workflow does not read (a typo would otherwise be ignored)."""
    known = set(known)
    unknown = set(raw) - known
    if unknown:
        raise cfglib.ConfigError(cfglib.unknown_message("config", unknown, known, noun="sections"))


def parse_config(raw: dict, sections: Mapping[str, SectionParser]) -> Config:
    """Each section of ``raw`` through its parser (absent sections get their defaults); unknown sections fail."""
    check_sections(raw, sections)
    return Config(raw, {name: parse(cfglib.section(raw, name)) for name, parse in sections.items()})


RUN_FILE = "config.yaml"  # a run's resolved config: what makes a folder a run that --resume may continue
# Which command wrote a run ({"command": "personalize"}), written after RUN_FILE: --resume and --overwrite act only
# on the same command's runs. Runs from before it carry none; for those the config's sections decide.
RUN_MARKER = "run.json"
# What a resumed run may change (fnmatch patterns over dotted keys): the learning rate (the way on after a
# diverged run), logging and checkpoint cadence, the evaluation samples. Anything else would make the checkpoint
# and the data order belong to another run.
RESUME_MAY_CHANGE = ("*optimizer.learning_rate", "loop.log_every", "loop.checkpoint_every", "loop.max_to_keep",
                     "loop.tensorboard", "loop.progress", "loop.async_checkpoint", "*.eval_*")


def check_batch_divides_processes(batch: int, key: str, *, examples: int | None = None) -> None:
    """``key``'s global batch (``examples`` examples when its rows make several, e.g. DreamBooth pairs) is read in
    equal shares by the processes: refuse, before any work, one that does not divide (the data loader would say so
    only when the run reached that training, e.g. after an implantation, in its check)."""
    import jax

    from persguard_jax.data.batches import check_split
    try:
        check_split(batch, batch if examples is None else examples, jax.process_count())
    except ValueError as e:
        raise cfglib.ConfigError(f"{key}: {e} (each reads an equal share of every batch)") from None


def check_devices(config: Config) -> None:
    """The ``mesh`` section against the devices this process sees, before any work."""
    import jax

    from persguard_jax import sharding as shd
    mesh = config.get("mesh")
    if isinstance(mesh, shd.MeshConfig):
        shd.resolve_shape(mesh, jax.device_count())


def prompt_argument(text: str) -> str:
    """An argparse type for a prompt: not blank (a blank one would be measured, or replaced by the config's)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# The command-line arguments that name what a command reads (an --overwrite must not delete them).
INPUT_ARGUMENTS = ("model", "images", "instance_dir", "class_dir", "clean", "perturbed", "clip", "config")


def _strings(tree: Any) -> Iterable[str]:
    """Every string in a tree of mappings, lists and tuples."""
    if isinstance(tree, str):
        yield tree
    elif isinstance(tree, Mapping):
        for value in tree.values():
            yield from _strings(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _strings(value)


def input_paths(args: argparse.Namespace, raw_config: Mapping[str, Any] | None = None) -> list[str]:
    """What a command reads, so that ``--overwrite`` never deletes it: the paths ``args`` names in
    ``INPUT_ARGUMENTS``, and every existing path any other argument (``--out`` aside; a ``key=value`` override also
    by its value) or config value names, itself or as the folder of a ``FOLDER:CLASS[:TYPE]`` spec (``implant
    --protect``, ``dreambooth.class_dir``, ``implant.pattern_image``...: no list of keys to keep up to date)."""
    paths = [p for p in (getattr(args, a, None) for a in INPUT_ARGUMENTS) if p is not None]
    named = [v for k, v in vars(args).items() if k not in ("out", *INPUT_ARGUMENTS)]
    for text in (*_strings(named), *_strings(raw_config or {})):
        for value in (text, text.split("=", 1)[1]) if "=" in text else (text,):
            named_path = _named_path(value)
            if named_path is not None:
                paths.append(named_path[0])
    return paths


def _named_path(value: str) -> tuple[str, str] | None:
    """(the existing path ``value`` names, what follows it): ``value`` itself, or the folder of a
    ``FOLDER:CLASS[:TYPE]`` spec (folder names may hold colons: cut from the right); None for anything else,
    a ``world:SUBJECT`` spec included."""
    if value.startswith("world:"):
        return None
    for cuts in range(min(value.count(":"), 2) + 1):
        head = value.rsplit(":", cuts)[0] if cuts else value
        if head and _exists(head):
            return head, value[len(head):]
    return None


def _exists(text: str) -> bool:
    """``text`` names an existing path (a prompt too long for a file name, or with a NUL, names none)."""
    try:
        return Path(text).exists()
    except (OSError, ValueError):
        return False


def _within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or inside it (both resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output(out: str | Path, *, overwrite: bool, resume: bool, raw_config: Mapping[str, Any] | None = None,
                 sections: Iterable[str] | None = None, inputs: Iterable[str | Path] = (),
                 command: str | None = None, resumable: bool = True) -> None:
    """Every rule of a run's output folder, checked without touching anything (so a command can refuse before
    any work): a new or empty folder whose parent can be created; an existing run only with ``resume`` (and then
    with the config it was started with, when ``raw_config`` is given) or ``overwrite``; never someone else's
    folder. A missing or empty folder with ``resume`` simply starts the run (re-running a preempted launch line
    works from the first launch on). ``command``: the command asking; a run whose ``RUN_MARKER`` names another
    was written by another command, and is neither resumed nor replaced by this one. ``sections``: the command's
    config sections, the same rule for runs with no marker (a config with other sections is another command's).
    ``inputs``: paths the command reads, which ``overwrite`` must not delete. ``resumable=False``: a command
    with no ``--resume`` (its errors offer ``--overwrite`` only)."""
    from persguard_jax.errors import RunError
    out = Path(out)
    flags = "--resume and --overwrite act" if resumable else "--overwrite acts"
    if overwrite and resume:
        raise ValueError("--overwrite and --resume: choose one (continue the run, or start it again)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if not out.exists():
        check_creatable(out)
    if not out.exists() or not any(out.iterdir()):
        return
    is_run = (out / RUN_FILE).is_file()
    if not resume and not overwrite:
        raise FileExistsError(f"{out}: already exists and is not empty (pass "
                              + ("--resume to continue the run in it, or " if resumable else "")
                              + "--overwrite to replace it, or pick a new --out)")
    if not is_run:
        raise RunError(f"{out}: not a run's folder (no {RUN_FILE}); {flags} only on a folder a run wrote, so pick "
                       f"a new --out")
    owner = run_command(out)
    if command is not None and owner is not None and owner != command:
        raise RunError(f"{out}: a run of `persguard {owner}` ({RUN_MARKER}), not of `persguard {command}`; {flags} "
                       f"only on this command's runs, so pick a new --out")
    if sections is not None and owner is None:
        foreign = sorted(set(cfglib.read_yaml(out / RUN_FILE)) - set(sections))
        if foreign:
            raise RunError(f"{out}: a run of another command (its {RUN_FILE} has sections {foreign}, which this "
                           f"command does not have); {flags} only on this command's runs, so pick a new --out")
    if overwrite:
        for path in map(Path, inputs):
            if _within(path, out):
                raise RunError(f"{out}: --overwrite would delete {path}, an input of this command; pick a new --out")
    if resume and raw_config is not None:
        _check_same_config(out / RUN_FILE, raw_config)
    if resume:
        _check_checkpoints(out)


def run_command(out: str | Path) -> str | None:
    """The command that wrote the run in ``out`` (its ``RUN_MARKER``), or None for a run from before markers."""
    from persguard_jax.errors import RunError
    from persguard_jax.io import read_json
    path = Path(out) / RUN_MARKER
    if not path.exists():
        return None
    marker = read_json(path, error=RunError)
    if not isinstance(marker, dict) or not isinstance(marker.get("command"), str):
        raise RunError(f"{path}: expected {{\"command\": NAME}}, got {marker!r:.80}")
    return marker["command"]


def _check_checkpoints(out: Path) -> None:
    """Each ``checkpoints/`` folder of the run must hold a complete checkpoint if it holds any, or resuming
    would quietly start that training again from step 0."""
    from persguard_jax.errors import RunError
    from persguard_jax.train.checkpoint import saved_steps
    for folder in sorted(out.rglob("checkpoints")):
        steps, complete = saved_steps(folder)
        if steps and not complete:
            raise RunError(f"{folder}: none of the checkpoints (steps {steps}) is complete; the run cannot resume "
                           f"(start a new --out, or --overwrite to start this one again)")


def _check_same_config(path: Path, raw_config: Mapping[str, Any]) -> None:
    """A resumed run must run the config it was started with (its checkpoints and data order depend on it),
    except for ``RESUME_MAY_CHANGE``."""
    saved = cfglib.read_yaml(path)
    given = cfglib.parse_yaml(cfglib.dumps(dict(raw_config)))  # what start_run would write, read back
    changed = [d for d in _differences(saved, given)
               if not any(fnmatch.fnmatchcase(d[0], pattern) for pattern in RESUME_MAY_CHANGE)]
    if changed:
        shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise cfglib.ConfigError(f"{path}: the run was started with another config ({shown}{more}); --resume it "
                                 f"with the same config and arguments, or start a new --out")


def _differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, a's value, b's value) wherever the nested mappings differ (an absent section is empty)."""
    if isinstance(a, Mapping) and b is None or isinstance(b, Mapping) and a is None:
        a, b = a or {}, b or {}
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [d for key in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def check_apart(out: str | Path, inputs: str | Path, flag: str) -> None:
    """``--out`` must be neither the input folder ``flag`` names nor inside it (outputs would mix with the inputs,
    and a rerun would read them), nor hold it (``--overwrite`` deletes ``--out``)."""
    out, inputs = Path(out).resolve(), Path(inputs).resolve()
    if _within(out, inputs):
        raise ValueError(f"--out {out}: is {flag} or inside {flag}; the inputs are only read, write to another folder")
    if _within(inputs, out):
        raise ValueError(f"--out {out}: holds {flag} {inputs}; write to another folder")


def prepare_output(out: Path, *, overwrite: bool, resume: bool, raw_config: Mapping[str, Any] | None = None,
                   command: str | None = None) -> None:
    """``check_output``, then process 0 creates the folder (``overwrite``: deletes the earlier run first). Every
    process checks (so all fail alike); only process 0 changes anything."""
    from persguard_jax.train.distributed import barrier, is_writer
    out = Path(out)
    check_output(out, overwrite=overwrite, resume=resume, raw_config=raw_config, command=command)
    if is_writer():
        if out.exists() and overwrite:
            # RUN_FILE last: an --overwrite killed part-way leaves a folder still marked as a run, which the next
            # --overwrite replaces (without it, every later --overwrite and --resume refuses the folder)
            for child in out.iterdir():
                if child.name == RUN_FILE:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            (out / RUN_FILE).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    barrier(f"prepare {out}")


def run_inputs(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The command-line inputs ``names`` of ``args`` that a run's checkpoints depend on but its config does not hold
    (``--model``, photo folders, implant's subject specs), for ``start_run(inputs=...)``: each path that exists is
    made absolute (a ``FOLDER:CLASS[:TYPE]`` spec by its folder), so resuming from another directory matches."""
    def norm(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        named_path = _named_path(value) if isinstance(value, str) else None
        return value if named_path is None else f"{Path(named_path[0]).resolve()}{named_path[1]}"
    return {name: norm(getattr(args, name, None)) for name in names}


def start_run(out: str | Path, raw_config: Mapping[str, Any], *, overwrite: bool, resume: bool,
              command: str | None = None, inputs: Mapping[str, Any] | None = None) -> Path:
    """``prepare_output`` then ``out/config.yaml`` (the resolved config, from process 0, written atomically:
    it is what marks the folder as a run) and, given ``command`` (the ``persguard`` command whose run this is),
    ``RUN_MARKER``; returns ``out``. ``inputs``: command-line arguments outside the config that the checkpoints
    depend on (implant's subject specs), kept in ``RUN_MARKER``; ``--resume`` with others is refused."""
    from persguard_jax.io import read_json, save_json
    from persguard_jax.train.distributed import is_writer
    out = Path(out)
    marker = out / RUN_MARKER
    if resume and inputs is not None and marker.is_file():
        recorded = read_json(marker)
        saved = recorded.get("inputs") if isinstance(recorded, dict) else None
        given = json.loads(json.dumps(dict(inputs)))
        changed = sorted(k for k in given if saved is not None and k in saved and saved[k] != given[k])
        if changed:
            k = changed[0]
            raise ValueError(f"{out}: the run was started with --{k.replace('_', '-')} {saved[k]}, not {given[k]}; "
                             f"--resume it with the same arguments, or start a new --out")
    prepare_output(out, overwrite=overwrite, resume=resume, raw_config=raw_config, command=command)
    if is_writer():
        cfglib.dump(dict(raw_config), out / RUN_FILE)
        if command is not None:  # after RUN_FILE: a kill between the two leaves a run the sections rule covers
            save_json({"command": command, **({"inputs": dict(inputs)} if inputs is not None else {})}, marker)
    return out


def loop_config(section: Mapping[str, Any], num_steps: int):
    """A ``LoopConfig`` for ``num_steps`` from a config's ``loop`` section over ``SMALL_RUN_LOOP``."""
    from persguard_jax.train import LoopConfig
    return LoopConfig.from_dict({**SMALL_RUN_LOOP, **section, "num_steps": num_steps})


def into_out(fn: Callable[..., dict]) -> Callable[[argparse.Namespace, Config], dict]:
    """A ``Workflow.run`` for a library function ``fn(out, config, *, overwrite, resume)`` that owns ``--out``."""
    def run(args: argparse.Namespace, config: Config) -> dict:
        return fn(args.out, config, overwrite=args.overwrite, resume=args.resume)
    return run


def _parses(fn: Callable[[], Any]) -> bool:
    try:
        fn()
    except ValueError:
        return False
    return True


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


def _as_is(raw: dict, args: argparse.Namespace) -> dict:
    return raw


@dataclass(frozen=True)
class Workflow:
    """One ``persguard`` command (see the module docstring).

    ``sections()`` maps each config section to its parser (a function, so the engine is imported only when a
    command runs); ``run(args, config)`` does the work and returns the results (or ``{"preempted": True, "step": ...}``);
    ``summary(results)`` is what the command prints at the end. ``resolve(raw, args)`` moves command-line
    arguments into the raw config and derives defaults before parsing, so ``--print-config`` shows the values
    the run would use. ``out`` is the default ``--out`` (None: required)."""
    name: str
    help: str
    config: str
    sections: Callable[[], Mapping[str, SectionParser]]
    run: Callable[[argparse.Namespace, Config], dict]
    summary: Callable[[dict], str]
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    resolve: Callable[[dict, argparse.Namespace], dict] = _as_is
    out: str | None = None
    out_help: str = "new folder for checkpoints, the model and results"
    example: str = "loop.log_every=5"
    resumable: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)
    own_section: str | None = None  # a --config file (bases resolved) must have it: else it is another command's

    def add_to(self, sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """The subcommand: this workflow's arguments, then the ones every run takes."""
        parser = sub.add_parser(self.name, help=self.help, description=self.help)
        self.arguments(parser)
        parser.add_argument("--out", required=self.out is None, default=self.out, help=self.out_help)
        parser.add_argument("--config", help=f"YAML config file, or the name of a shipped one (default: "
                                             f"{self.config})")
        if self.resumable:
            parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
            parser.add_argument("--resume", action="store_true", help="continue the run in an existing --out folder")
        parser.add_argument("--print-config", action="store_true",
                            help="print the resolved config (defaults filled in) and exit")
        parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {self.example}")
        parser.set_defaults(workflow=self)
        return parser

    def load(self, args: argparse.Namespace) -> Config:
        """The config this invocation runs with: file (or the shipped default), overrides, resolve, parse.

        A value that fails its check is reported with where it came from: the file, or the command line."""
        from persguard_jax.resources import config_path
        path = config_path(args.config or self.config)
        file_raw = cfglib.read_config(path)
        if args.config and self.own_section and self.own_section not in file_raw:
            raise cfglib.ConfigError(f"{path}: no {self.own_section} section (every {self.own_section} key would be "
                                     f"a default): a config of another command? persguard {self.name}'s own: "
                                     f"{self.config}")
        overrides = tuple(getattr(args, "overrides", ()) or ())
        raw = cfglib.apply_overrides(file_raw, overrides)  # its errors name the command line already
        try:
            return parse_config(self.resolve(raw, args), self.sections())
        except ValueError as e:
            if overrides and _parses(lambda: parse_config(self.resolve(file_raw, args), self.sections())):
                raise cfglib.ConfigError(f"command line: {e}") from None
            raise cfglib.ConfigError(f"{path}: {e}") from None

    def main(self, args: argparse.Namespace) -> None:
        """The CLI entry: parse the config before any work, run, and say how it ended (process 0 prints)."""
        from persguard_jax.train.distributed import is_writer
        config = self.load(args)
        if args.print_config:
            print(cfglib.dumps(config.resolved()), end="")
            return
        check_devices(config)
        if self.resumable:  # the output folder's rules, before any input is read or any work done
            check_output(args.out, overwrite=args.overwrite, resume=args.resume, raw_config=config.raw,
                         sections=self.sections(), inputs=input_paths(args, config.raw), command=self.name)
        results = self.run(args, config)
        if not is_writer():
            return
        if results.get("preempted"):
            stage = f"in stage {results['stage']} " if "stage" in results else ""
            print(f"stopped {stage}at step {results['step']} (SIGTERM); rerun the same command with --resume "
                  f"to continue")
            return
        print(self.summary(results))
