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
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from persguard_jax import config as cfglib

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


class Config:
    """A workflow's config, parsed: each section as an attribute, and ``raw``, the YAML mapping it came from."""

    def __init__(self, raw: dict, sections: Mapping[str, Any]):
        self.raw, self._sections = raw, dict(sections)

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("_sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"config has no section {name!r}; sections: {sorted(sections)}")

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
        raise cfglib.ConfigError(f"config: unknown sections {sorted(unknown)}; known: {sorted(known)}")


def parse_config(raw: dict, sections: Mapping[str, SectionParser]) -> Config:
    """Each section of ``raw`` through its parser (absent sections get their defaults); unknown sections fail."""
    check_sections(raw, sections)
    return Config(raw, {name: parse(cfglib.section(raw, name)) for name, parse in sections.items()})


def prepare_output(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to touch an existing non-empty folder unless told: ``resume`` continues in it, ``overwrite``
    deletes it first. Every process checks (so all fail alike); only process 0 changes anything."""
    from persguard_jax.train.distributed import barrier, is_writer
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not resume and not overwrite:
        raise FileExistsError(f"{out}: already exists and is not empty (pass --resume to continue the run in it, "
                              f"or --overwrite to replace it)")
    if is_writer():
        if out.exists() and overwrite and not resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    barrier(f"prepare {out}")


def start_run(out: str | Path, raw_config: Mapping[str, Any], *, overwrite: bool, resume: bool) -> Path:
    """``prepare_output`` then ``out/config.yaml`` (the resolved config, from process 0); returns ``out``."""
    from persguard_jax.train.distributed import is_writer
    out = Path(out)
    prepare_output(out, overwrite=overwrite, resume=resume)
    if is_writer():
        cfglib.dump(dict(raw_config), out / "config.yaml")
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
        """The config this invocation runs with: file (or the shipped default), overrides, resolve, parse."""
        from persguard_jax.resources import config_path
        raw = cfglib.load_config(config_path(args.config or self.config), getattr(args, "overrides", ()))
        return parse_config(self.resolve(raw, args), self.sections())

    def main(self, args: argparse.Namespace) -> None:
        """The CLI entry: parse the config before any work, run, and say how it ended (process 0 prints)."""
        from persguard_jax.train.distributed import is_writer
        config = self.load(args)
        if args.print_config:
            print(cfglib.dumps(config.resolved()), end="")
            return
        results = self.run(args, config)
        if not is_writer():
            return
        if results.get("preempted"):
            stage = f"in stage {results['stage']} " if "stage" in results else ""
            print(f"stopped {stage}at step {results['step']} (SIGTERM); rerun the same command with --resume "
                  f"to continue")
            return
        print(self.summary(results))
