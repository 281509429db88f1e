"""The ``workbench`` command line: ``demo``, ``scan retrieval|sinks|duo|routing|heads``, ``study run|report``, ``serve``,
``doctor``. Every option is checked before a model loads; failures print a message and exit non-zero
(see :func:`_guard`)."""
from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click
import typer
from typer.exceptions import TyperException  # typer vendors click: its BadParameter is not click's

from . import load, routing
from .base.errors import WorkbenchError
from .measure import duo, qrhead, retrieval, sinks, taxonomy
from .measure import representation as rep
from .measure import spans as span_profile
from .models import embedded
from .models.embedded import cache_dir
from .models.loading import load_config
from .models.spec import ModelSpec, config_spec
from .routing import joint as attention_routing
from .study import Run, run_study

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Interpretability workbench: sinks, retrieval heads, MoE routing.")
scan_app = typer.Typer(no_args_is_help=True, help="Scan a model for retrieval heads or attention sinks.")
app.add_typer(scan_app, name="scan")

DEMO_PROMPT = "What is the capital of France? Answer in one sentence."


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None
    if not out:
        raise typer.BadParameter(f"no {what} given")
    return out


EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 3, 130


def _cli_exceptions() -> tuple[type[BaseException], ...]:
    return (typer.Exit, typer.Abort, TyperException, click.exceptions.Exit, click.exceptions.Abort, click.ClickException)


_CLI_EXCEPTIONS = _cli_exceptions()


# options whose values are secrets: never written to a log (crash logs may be read by others, or sent in a report)
SECRET_OPTIONS = ("--basic-auth", "--cookie-secret", "--oauth-key", "--oauth-secret", "--oauth-encryption-key")
REDACTED = "[redacted]"


def redacted_argv(argv: list[str]) -> tuple[list[str], set[str]]:
    """``argv`` with the values of :data:`SECRET_OPTIONS` (``--opt VALUE`` and ``--opt=VALUE``) replaced, and
    the secret values found (to redact them from any other text, e.g. an exception message quoting one)."""
    out, secrets = [], set()
    i = 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if name in SECRET_OPTIONS and eq:
            out.append(f"{name}={REDACTED}")
            secrets.add(value)
        elif a in SECRET_OPTIONS and i + 1 < len(argv):
            out += [a, REDACTED]
            secrets.add(argv[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    return out, {v for v in secrets if v}


def _crash_log(exc: BaseException, options: dict | None = None) -> Path:
    """Write ``exc``'s traceback to a log file (the cache's ``logs/``, else the temp folder); its path.

    Secrets never reach it: the values of :data:`SECRET_OPTIONS` (from the command line, and ``options``, the
    command's parsed keyword arguments) are replaced wherever they appear. The file is created 0600, new
    (``O_EXCL``: a planted file or symlink of that name is not written through), in a 0700 ``logs/``."""

    argv, secrets = redacted_argv(list(sys.argv[1:]))
    for key, value in (options or {}).items():
        if "--" + key.replace("_", "-") in SECRET_OPTIONS and isinstance(value, str) and value:
            secrets.add(value)
    text = f"workbench {' '.join(argv)}\n\n" + "".join(traceback.format_exception(exc))
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: one secret may contain another
        text = text.replace(secret, REDACTED)
    name = f"workbench-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{os.urandom(3).hex()}.log"
    for folder in (cache_dir() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write(text)
            return folder / name
        except OSError:
            continue
    return Path("(could not write a log file)")


def _guard(fn):
    """Errors become a message and a non-zero exit code, never a bare traceback:

    - :class:`WorkbenchError` (bad input, a model that cannot load, ...): ``error: <message>``, exit 2;
    - ``OSError`` (disk full, permission denied, ...) and ``MemoryError``: what the system said, exit 2;
    - Ctrl-C: exit 130;
    - anything else is a bug: ``internal error, please report`` with the traceback written to a log file
      whose path is printed, exit 3."""
    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except _CLI_EXCEPTIONS:  # usage errors and exits: the CLI framework reports them itself
            raise
        except WorkbenchError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except MemoryError:
            typer.echo("error: out of memory; try smaller inputs (shorter lengths, fewer texts) or a machine with more memory", err=True)
            raise typer.Exit(EXIT_ERROR) from None
        except OSError as e:
            log = _crash_log(e, k)
            typer.echo(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''} (details: {log})", err=True)
            raise typer.Exit(EXIT_ERROR) from None
        except Exception as e:  # noqa: BLE001 - a bug: say so, keep the traceback
            log = _crash_log(e, k)
            typer.echo(f"internal error, please report: {type(e).__name__}: {e}\ntraceback written to {log}", err=True)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def _load(model: str | None):
    t0 = time.perf_counter()
    typer.echo("loading model (the first run fetches the 93 MB wheel from PyPI and converts it, ~1 min) ...")
    m = load(model)
    typer.echo(f"loaded {m!r} in {time.perf_counter() - t0:.1f} s")
    return m


# --- checks made before any model loads -----------------------------------------------------------------------


def _spec(model: str | None) -> ModelSpec | None:
    """The model's :class:`ModelSpec` as its config tells it, read without weights; ``None`` when only a load
    can tell (a .gguf file). A source that does not exist fails here, before anything loads."""
    if model and str(model).endswith(".gguf"):
        if not Path(model).is_file():
            raise WorkbenchError(f"GGUF file not found: {model}")
        return None
    return config_spec(load_config(model))


def _out_dir(out: Path) -> Path:
    """``--out``: a directory (made if missing) this process can write to; refused now, not after the scan."""
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} is an existing file; give a directory for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".workbench-write-check-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise WorkbenchError(f"cannot write to --out {out} ({e.strerror or e}); choose another directory") from None
    return out


def _report(out: Path, title: str, items: list) -> None:
    """Results → Parquet in ``out`` (each with its provenance) and one HTML report; prints where."""
    # deferred: the report pulls in plotly/kaleido and the store duckdb/pyarrow, needed only by commands that write
    from .store.results import ResultStore
    from .views import report

    store = ResultStore(out)
    for it in items:
        if hasattr(it, "save"):
            it.save(store)
    typer.echo(f"report: {report.write_html(out / 'report.html', title, items)}\nresults (Parquet): {out}")


@app.callback()
def _main() -> None:
    """Run `workbench demo` first."""


@app.command()
@_guard
def demo(
    model: str = typer.Option(None, help="model source (default: embedded SmolLM2-135M-Instruct)"),
    prompt: str = typer.Option(DEMO_PROMPT, help="chat prompt for the greedy generation"),
    max_new_tokens: int = typer.Option(32, min=1, max=512),
    lengths: str = typer.Option("500,1000", help="NIAH context lengths for the short retrieval scan"),
    depths: int = typer.Option(3, min=1, help="needle depths per length"),
    out: Path = typer.Option(Path("results/demo"), help="where the HTML report and Parquet results go"),
) -> None:
    """Load the model, print its ModelSpec, generate greedily, then a short sink + retrieval scan with an HTML report."""
    cfg = retrieval.RetrievalConfig(lengths=_ints(lengths, "lengths"), depths=depths)
    lens = list(cfg.lengths)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise WorkbenchError(f"--prompt is not valid text: a lone surrogate at position {e.start} (the shell passed bytes "
                             "that are not UTF-8); re-type the prompt or fix the terminal's encoding") from None  # fmt: skip
    cfg.check(_spec(model))
    _out_dir(out)
    m = _load(model)
    typer.echo("\n" + m.spec.summary() + "\n")
    typer.echo(f"prompt: {prompt}")
    t0 = time.perf_counter()
    answer = m.generate(prompt, max_new_tokens=max_new_tokens)
    typer.echo(f"greedy answer ({time.perf_counter() - t0:.1f} s): {answer.strip()}\n")
    s = sinks.scan(m)
    typer.echo(s.summary() + "\n")
    r = retrieval.scan(m, cfg)
    typer.echo(r.summary() + "\n")
    _report(out, f"workbench demo — {m.source}", [("Model", m.spec.summary()), s, r])
    typer.echo("next: `workbench scan retrieval --lengths 500,1000,2000 --depths 5`, `workbench scan sinks --T 512`,\n"
               "      `workbench study run studies/retrieval_ablation.toml`, `workbench serve` (dashboard),\n"
               "      notebooks/ in JupyterLab, or in Python: import workbench as wb; m = wb.load(); wb.retrieval.scan(m)")  # fmt: skip


@scan_app.command("retrieval")
@_guard
def scan_retrieval(
    model: str = typer.Option(None, help="model source (default: embedded SmolLM2)"),
    lengths: str = typer.Option("500,1000,2000", help="comma-separated context lengths in tokens"),
    depths: int = typer.Option(5, min=1, help="needle depths per length, spread over 0–100%"),
    needles: int = typer.Option(1, min=1, help="needles per (length, depth)"),
    variant: str = typer.Option("set", help="set (paper) or per_step (released code)"),
    max_new_tokens: int = typer.Option(32, min=2),
    ablation_k: int = typer.Option(0, min=0, help="also run the causal test: top-K vs K random heads ablated"),
    mode: str = typer.Option("uniform", help="ablation mode for the causal test: uniform (Wu's masking) | zero"),
    out: Path = typer.Option(Path("results/retrieval"), help="results directory"),
) -> None:
    """Wu et al. retrieval heads over a NIAH grid; prints the top heads, writes Parquet + HTML."""
    if variant not in retrieval.VARIANTS:
        raise WorkbenchError(f"--variant must be one of {', '.join(retrieval.VARIANTS)}, got {variant!r}")
    if mode not in retrieval.CAUSAL_MODES:
        raise WorkbenchError(f"--mode must be one of {', '.join(retrieval.CAUSAL_MODES)}, got {mode!r}")
    cfg = retrieval.RetrievalConfig(lengths=_ints(lengths, "lengths"), depths=depths, n_needles=needles, variant=variant,
                                    max_new_tokens=max_new_tokens)  # fmt: skip
    spec = _spec(model)
    cfg.check(spec)
    if ablation_k and spec is not None and ablation_k >= (heads := spec.n_layers * spec.n_heads):
        raise WorkbenchError(f"--ablation-k {ablation_k} must be below the model's {heads} heads")
    _out_dir(out)
    m = _load(model)
    r = retrieval.scan(m, cfg)
    typer.echo(r.summary())
    results = [r]
    if ablation_k:
        ab = retrieval.ablation_check(m, r, k=ablation_k, mode=mode, max_new_tokens=max_new_tokens)
        typer.echo("\n" + ab.summary())
        results.append(ab)
    _report(out, f"retrieval heads — {m.source}", results)


@scan_app.command("sinks")
@_guard
def scan_sinks(
    model: str = typer.Option(None, help="model source (default: embedded SmolLM2)"),
    T: int = typer.Option(64, "--T", min=2, help="tokens per text (Gu et al.: 64)"),
    eps: float = typer.Option(0.3, help="ε of Sink_k^ε, in (0, 1)"),
    calibrate: bool = typer.Option(False, help="also run the ACT calibration experiment on the sentiment task"),
    out: Path = typer.Option(Path("results/sinks"), help="results directory"),
) -> None:
    """Gu et al. Sink_k^ε, ACT hidden sinks and massive activations on the shipped prose."""
    spec = _spec(model)
    positions = spec.max_positions if spec is not None else None
    if positions and T > positions:
        raise WorkbenchError(f"--T {T} exceeds the model's {positions} positions")
    cfg = sinks.SinkConfig(T=T, eps=eps, texts=sinks.texts_for(T))  # says so when the shipped prose is too short for T
    _out_dir(out)
    m = _load(model)
    s = sinks.scan(m, cfg)
    typer.echo(s.summary())
    results = [s]
    if calibrate:
        cal = sinks.calibration_experiment(m, s)
        typer.echo("\n" + cal.summary())
        results.append(cal)
    _report(out, f"attention sinks — {m.source}", results)


@scan_app.command("duo")
@_guard
def scan_duo(
    model: str = typer.Option(None, help="model source (default: embedded SmolLM2)"),
    steps: int = typer.Option(16, min=1, help="gate training steps (one passkey sample each)"),
    length: int = typer.Option(384, min=64, help="training/evaluation context length"),
    sink: int = typer.Option(16, min=0, help="streaming heads keep the first SINK keys (paper: 64 at long context)"),
    recent: int = typer.Option(64, min=1, help="... and the last RECENT keys (paper: 256)"),
    out: Path = typer.Option(Path("results/duo"), help="results directory"),
) -> None:
    """DuoAttention: train one gate per KV head, sweep the streaming fraction, compare with Wu's heads."""
    cfg = duo.DuoConfig(length=length, steps=steps, sink=sink, recent=recent, sweep=(0.0, 0.25, 0.5, 0.75, 1.0))
    spec = _spec(model)
    positions = spec.max_positions if spec is not None else None
    if positions and length > positions:
        raise WorkbenchError(f"--length {length} exceeds the model's {positions} positions")
    wu_length = min(1000, length * 2, positions - 32 if positions else 1000)  # the comparison with Wu's heads scans here
    wu_cfg = retrieval.RetrievalConfig(lengths=[wu_length], depths=3)
    wu_cfg.check(spec)
    _out_dir(out)
    m = _load(model)
    d = duo.scan(m, cfg)
    typer.echo(d.summary())
    wu = retrieval.scan(m, wu_cfg)
    agree = d.agreement(wu, m.spec.group_size)
    typer.echo(f"\nagreement with Wu's retrieval heads: {agree['agree'].mean() * 100:.0f}% of KV heads; disagreements:\n"
               + agree[~agree["agree"]].to_string(index=False))  # fmt: skip
    _report(out, f"DuoAttention gates — {m.source}", [d, wu, ("Agreement with Wu et al. retrieval heads (per KV head)", agree)])


@scan_app.command("routing")
@_guard
def scan_routing(
    model: str = typer.Option("tiny-moe", help="an MoE model source (default: the zoo's tiny-moe)"),
    texts: Path = typer.Option(None, help="a UTF-8 text file, one text per blank-line-separated paragraph (default: the shipped domains)"),
    max_tokens: int = typer.Option(256, min=2, help="tokens per text"),
    joint: bool = typer.Option(True, help="also attention × routing: which experts sink and massive-activation tokens go to"),
    out: Path = typer.Option(Path("results/routing"), help="results directory"),
) -> None:
    """MoE routing over labelled texts: expert load, specialisation by label, routing margins; and where the
    attention-sink and massive-activation tokens are routed."""
    paragraphs = None
    if texts is not None:
        try:
            paragraphs = [p.strip() for p in texts.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        except UnicodeDecodeError:
            raise WorkbenchError(f"--texts {texts} is not UTF-8 text") from None
    cfg = routing.RoutingConfig(texts=paragraphs, max_tokens=max_tokens)
    joint_cfg = attention_routing.JointConfig(texts=cfg.texts, max_tokens=max_tokens) if joint else None
    _out_dir(out)
    m = _load(model)
    results = [routing.scan(m, cfg)]
    if joint_cfg is not None:
        results.append(attention_routing.scan(m, joint_cfg))
    typer.echo("\n\n".join(r.summary() for r in results))
    _report(out, f"MoE routing — {m.source}", results)


@scan_app.command("heads")
@_guard
def scan_heads(
    model: str = typer.Option(None, help="model source (default: embedded SmolLM2)"),
    lengths: str = typer.Option("128,256,512", help="comma-separated input lengths in tokens"),
    texts: int = typer.Option(3, min=0, help="prose texts per length (plus one repeated random sequence)"),
    local_window: int = typer.Option(8, min=1, help="w of the local mass (keys i − j < w)"),
    retrieval_lengths: str = typer.Option(None, help="also run Wu's NIAH scan and QRHead at these lengths and place heads on them"),
    spans: bool = typer.Option(True, help="also the MoA span profile (90% span per head over the lengths, span(N) = a + b·N)"),
    representation: bool = typer.Option(True, help="also per-layer representation entropy and BOS norm (compression valley)"),
    out: Path = typer.Option(Path("results/heads"), help="results directory"),
) -> None:
    """Head types at any length: previous-token, self, local, induction heads and distance profiles next to
    sink α₀; the MoA span profile; the compression valley; with --retrieval-lengths Wu's retrieval score and
    query-focused retrieval heads (QRHead) and how the three agree."""
    lens = _ints(lengths, "lengths")
    cfg = taxonomy.TaxonomyConfig(lengths=lens, n_texts=texts, local_window=local_window)
    span_lens = lens if len(set(lens)) > 1 else [n for n in (max(lens) // 4, max(lens) // 2, max(lens)) if n >= 4]  # a rule needs 2+
    span_cfg = span_profile.SpanConfig(lengths=span_lens) if spans else None
    rep_cfg = rep.RepresentationConfig(T=max(lens)) if representation else None
    wu_cfg = retrieval.RetrievalConfig(lengths=_ints(retrieval_lengths, "retrieval lengths"), depths=3) if retrieval_lengths else None
    qr_cfg = qrhead.QRConfig(lengths=wu_cfg.lengths, depths=3) if wu_cfg is not None else None
    spec = _spec(model)
    positions = spec.max_positions if spec is not None else None
    if positions and max(lens) > positions:
        raise WorkbenchError(f"--lengths: {max(lens)} exceeds the model's {positions} positions")
    if wu_cfg is not None:
        wu_cfg.check(spec)
    _out_dir(out)
    m = _load(model)
    results = []
    wu = retrieval.scan(m, wu_cfg) if wu_cfg is not None else None
    t = taxonomy.scan(m, cfg, retrieval=wu)
    typer.echo(t.summary())
    results.append(t)
    if span_cfg is not None:
        results.append(span_profile.scan(m, span_cfg))
    if rep_cfg is not None:
        results.append(rep.scan(m, rep_cfg))
    if qr_cfg is not None:
        qr = qrhead.scan(m, qr_cfg)
        results += [qr, wu, ("QRHead vs Wu et al. (per head)", qr.agreement(wu))]
    for r in results[1:]:
        if hasattr(r, "summary"):
            typer.echo("\n" + r.summary())
    _report(out, f"head types — {m.source}", results)


# --- scripted studies ------------------------------------------------------------------------------
study_app = typer.Typer(no_args_is_help=True, help="Declarative head/expert ablation sweeps (TOML study files).")
app.add_typer(study_app, name="study")


@study_app.command("run")
@_guard
def study_run(
    file: Path = typer.Argument(..., help="study file (TOML), e.g. studies/retrieval_ablation.toml"),
    out: Path = typer.Option(None, help="run directory (default runs/<study name>)"),
    executor: str = typer.Option("local", help="local (in-process) or ray"),
    address: str = typer.Option(None, help="Ray cluster address (e.g. auto or ray://head:10001); default: a local Ray"),
    workers: int = typer.Option(None, min=1, help="Ray actors (default: one per GPU, or per CPU)"),
    resume: bool = typer.Option(False, "--resume", help="continue an existing run directory: only missing units run"),
    report: bool = typer.Option(True, help="write the report when the sweep ends"),
) -> None:
    """Run every unit of a study; results land in RUN_DIR/units as they complete. Exit code 1 when units failed."""
    run = run_study(file, out, executor=executor, address=address, workers=workers, resume=resume)
    st = run.status()
    typer.echo(f"{run.path}: {st['n_done']}/{st['n_units']} units done, {st['n_failed']} failed")
    typer.echo(run.summary().to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if report:
        typer.echo(f"report: {run.report()}")
    if st["n_failed"]:
        typer.echo(f"{st['n_failed']} unit(s) failed; tracebacks in {run.path / 'failures'}; rerun with --resume", err=True)
        raise typer.Exit(1)


@study_app.command("report")
@_guard
def study_report(
    run_dir: Path = typer.Argument(..., help="a run directory written by `workbench study run`"),
    png: bool = typer.Option(True, help="also write one PNG per figure (needs chromium)"),
) -> None:
    """Write RUN_DIR/report/index.html (figures, summary table, failures), summary.csv and PNGs."""
    if not run_dir.is_dir():
        raise WorkbenchError(f"{run_dir} is not a directory; give a run directory written by `workbench study run`")
    run = Run(run_dir)
    typer.echo(run.summary().to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    fails = run.failures()
    if len(fails):
        typer.echo(f"{len(fails)} failed unit(s):\n" + fails[["unit", "error"]].to_string(index=False))
    typer.echo(f"report: {run.report(png=png)}")
    if len(fails):
        raise typer.Exit(1)


@app.command()
@_guard
def serve(
    address: str = typer.Option("127.0.0.1", help="interface to bind; anything but loopback (e.g. 0.0.0.0) is refused without --basic-auth or --oauth-provider"),
    port: int = typer.Option(5006, min=1, max=65535, help="port"),
    model: str = typer.Option(None, help="main model source (default: embedded SmolLM2)"),
    moe: list[str] = typer.Option(["tiny-moe"], help="MoE model(s) the Routing tab offers (repeat the option)"),
    runs: Path = typer.Option(Path("runs"), help="study runs directory shown in the Runs tab (nothing outside it is opened)"),
    max_prompt_tokens: int = typer.Option(None, min=2, help="prompt cap in tokens (default: the model's context)"),
    max_scan_tests: int = typer.Option(24, min=1, help="cap on NIAH tests per scan"),
    allow_websocket_origin: list[str] = typer.Option(None, help="extra HOST:PORT origins (behind a proxy); their names are also accepted as Host (loopback names always are)"),
    basic_auth: str = typer.Option(None, help="Panel basic auth: a password, or a JSON file of user → password"),
    cookie_secret: str = typer.Option(None, help="secret that signs auth cookies (set with --basic-auth / --oauth-provider)"),
    oauth_provider: str = typer.Option(None, help="Panel OAuth provider (github, google, azure, generic, ...)"),
    oauth_key: str = typer.Option(None, help="OAuth client id"),
    oauth_secret: str = typer.Option(None, help="OAuth client secret"),
    oauth_redirect_uri: str = typer.Option(None, help="OAuth redirect URI"),
    oauth_encryption_key: str = typer.Option(None, help="key encrypting OAuth tokens in cookies"),
    show: bool = typer.Option(False, help="open a browser tab"),
) -> None:
    """Serve the Panel dashboard (prompt lab, retrieval, sinks, routing, runs) on 127.0.0.1; /liveness answers when up."""
    # deferred: the dashboard imports panel/bokeh (seconds), needed only by `workbench serve`
    from .views.dashboard.serve import check_address, serve as serve_dashboard
    from .views.dashboard.state import Caps

    caps = Caps(max_prompt_tokens=max_prompt_tokens, max_scan_tests=max_scan_tests)
    check_address(address, port, auth=bool(basic_auth or oauth_provider))  # before the model loads
    if runs.exists() and not runs.is_dir():
        raise WorkbenchError(f"--runs {runs} is a file; give the directory holding study runs")
    _spec(model)  # a model source that does not exist fails now
    typer.echo(f"loading {model or 'the embedded model'} ...; dashboard: http://{address}:{port}/  (liveness: /liveness; Ctrl-C stops)")
    serve_dashboard(address, port, model=model, moe_models=moe or ["tiny-moe"], runs=runs, caps=caps, show=show,
                    allow_websocket_origin=allow_websocket_origin or None, basic_auth=basic_auth, cookie_secret=cookie_secret,
                    oauth_provider=oauth_provider, oauth_key=oauth_key, oauth_secret=oauth_secret,
                    oauth_redirect_uri=oauth_redirect_uri, oauth_encryption_key=oauth_encryption_key)  # fmt: skip


@app.command()
@_guard
def doctor(
    repair: bool = typer.Option(True, help="re-convert a corrupt conversion (re-fetch a corrupt GGUF)"),
) -> None:
    """Check the embedded model's cache in full: the GGUF against its pinned SHA-256, every converted file
    against the SHA-256 recorded at conversion, stale temp folders swept. (Each load checks only the
    files' stat fingerprints — microseconds — and hashes a file whose fingerprint changed.)"""
    r = embedded.verify(repair=repair)
    typer.echo(f"cache: {r['cache']}")
    typer.echo(f"GGUF: {r['gguf']}; conversion: {r['conversion']} (hashed in {r['hash_seconds']} s)")
    if r["swept"]:
        typer.echo("swept stale temp folders: " + ", ".join(r["swept"]))
    if r.get("repaired"):
        typer.echo(f"repaired: conversion now {r['conversion_after']}")
    elif r["conversion"] != "ok" or r["gguf"] not in ("ok", "not downloaded"):
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="workbench")


if __name__ == "__main__":
    sys.exit(main())
