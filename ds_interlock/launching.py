"""Starting DeepSpeed jobs from Python (tests, benchmarks) and cleaning up after them.

On CPU every launch leaves one 66 MB file per rank in /dev/shm that DeepSpeed never
removes (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``); about 80 launches
fill a 24 GiB machine. Each launch here gets its own port and removes its own files.
"""
import glob
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shm(port):
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.remove(path)
        except OSError:
            pass


def deepspeed_launch(num_procs, script, script_args, timeout=600, env=None, stream=False):
    """Run ``deepspeed --num_gpus N --master_port P script args`` with OMP_NUM_THREADS=1.

    Returns (returncode or None on timeout, combined output). ``stream`` also echoes
    the output as it comes (long benchmark runs show progress)."""
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs),
           "--master_port", str(port), script, *script_args]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONPATH"] = os.pathsep.join([ROOT, full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    try:
        if not stream:
            proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
            return proc.returncode, proc.stdout + proc.stderr
        lines = []
        with subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as proc:
            for line in proc.stdout:
                lines.append(line)
                sys.stdout.write(line)
            return proc.wait(timeout=timeout), "".join(lines)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, out + f"\n<timed out after {timeout}s>"
    finally:
        remove_shm(port)
