"""captioner.signals.StopFlag: a stop signal is never lost, whatever the main thread holds."""

import signal
import subprocess
import sys
import textwrap
import threading
import time

from captioner.signals import StopFlag


def test_the_handler_takes_no_lock_the_waiting_thread_may_hold():
    # A handler runs between two bytecodes of the main thread, also while it holds the
    # lock inside the Event it waits on; Event.set() there would block for good.
    flag = StopFlag()
    t = threading.Thread(target=lambda: [flag.event._cond.__enter__(), flag(signal.SIGTERM), flag.event._cond.__exit__()])
    t.start()
    t.join(5.0)
    assert not t.is_alive(), "the signal handler blocked on the event's lock"
    assert flag.is_set() and flag.reason == "SIGTERM"
    assert flag.wait(0) and flag.event.is_set()  # the main thread's wait hands it to other threads


def test_wait_times_out_and_a_thread_can_stop_it():
    flag = StopFlag()
    t0 = time.monotonic()
    assert flag.wait(0.2) is False and time.monotonic() - t0 >= 0.2
    threading.Timer(0.1, flag.set, args=("supervisor gave up",)).start()
    assert flag.wait(10.0) is True and flag.reason == "supervisor gave up"


def test_sigterm_stops_a_process_whose_other_threads_are_busy():
    code = textwrap.dedent(
        """
        import sys, threading
        from captioner.signals import StopFlag
        stop = StopFlag().install()
        def busy():
            while not stop.is_set():
                sum(range(1000))
        threading.Thread(target=busy, daemon=True).start()
        print("ready", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopped by", stop.reason, flush=True)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=10)
    assert p.returncode == 0 and out.strip() == "stopped by SIGTERM"
