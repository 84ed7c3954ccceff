package integration

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/supervise"
)

// hurryWorker says READY=1 and drains for ever on the drain signal,
// leaving a mark in the directory argv[1] for each one it gets:
// gen<N>-term1, gen<N>-term2, … With argv[2] "exit-on-second" it exits 0
// on the second, as a worker that has closed its idle connections does,
// after marking gen<N>-exited; with "ignore" it never exits; with
// "ignore-all" it never exits either, and catches every other signal it
// can, marking gen<N>-sig<number>, so that only a SIGKILL ends it.
const hurryWorker = `
import os, signal, socket, sys, time
marks, mode = sys.argv[1], sys.argv[2]
gen = os.environ["UPGRADER_GENERATION"]
terms = 0
def mark(name):
    open(os.path.join(marks, "gen%s-%s" % (gen, name)), "w").close()
def on_term(signum, frame):
    global terms
    terms += 1
    mark("term%d" % terms)
    if terms == 2 and mode == "exit-on-second":
        mark("exited")
        os._exit(0)
signal.signal(signal.SIGTERM, on_term)
if mode == "ignore-all":
    def on_other(signum, frame):
        mark("sig%d" % signum)
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM):
            try:
                signal.signal(sig, on_other)
            except (OSError, ValueError):
                pass
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect(os.environ["NOTIFY_SOCKET"])
    s.sendall(b"READY=1")
while True:
    time.sleep(3600)
`

// startHurry runs hurryWorker in mode under upgrader with a cap of one
// draining generation and a drain timeout far beyond the tests' waits,
// and upgrades twice: generation 1 drains, then is beyond the cap. It
// returns the directory of the marks.
func startHurry(t *testing.T, mode string) (p *proc, marks string) {
	t.Helper()
	marks = t.TempDir()
	worker := filepath.Join(marks, "worker.py")
	if err := os.WriteFile(worker, []byte(hurryWorker), 0o644); err != nil {
		t.Fatal(err)
	}
	p, _, _ = startScripted(t, "exec python3 "+worker+" "+marks+" "+mode,
		"--max-draining", "1", "--drain-timeout", "60s")
	p.signal(syscall.SIGUSR2)
	p.waitReady(2)
	waitHurryMark(t, marks, "gen1-term1") // draining, within the cap
	if genOf(p.status(), 1) == nil {
		t.Fatal("generation 1 left on its first drain signal; the worker drains for ever")
	}
	p.signal(syscall.SIGUSR2)
	p.waitReady(3)
	return p, marks
}

// waitHurryMark waits until the worker has left mark in dir.
func waitHurryMark(t *testing.T, dir, mark string) {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); !hurryMarked(dir, mark); {
		if time.Now().After(deadline) {
			t.Fatalf("no %s from the worker within 15s", mark)
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not synchronization
	}
}

func hurryMarked(dir, mark string) bool {
	_, err := os.Stat(filepath.Join(dir, mark))
	return err == nil
}

// hurryCaught lists the signals other than SIGTERM that generation gen's
// worker (in mode ignore-all) caught, by the marks it left.
func hurryCaught(t *testing.T, dir, gen string) []string {
	t.Helper()
	caught, err := filepath.Glob(filepath.Join(dir, gen+"-sig*"))
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range caught {
		caught[i] = strings.TrimPrefix(filepath.Base(c), gen+"-")
	}
	return caught
}

// gen1Gone waits until generation 1 has no process left, well within the
// 60s drain timeout.
func gen1Gone(t *testing.T, p *proc) {
	t.Helper()
	p.waitStatus(15*time.Second, "generation 1 gone", func(st supervise.Status) bool { return genOf(st, 1) == nil })
}

// Beyond --max-draining the oldest draining generation gets the drain
// signal again and may close what is idle and exit by itself, rather
// than be SIGKILLed with every connection it serves; the generation
// within the cap is left to drain.
func TestMaxDrainingHurriesTheOldestGeneration(t *testing.T) {
	p, marks := startHurry(t, "exit-on-second")
	gen1Gone(t, p)
	if !hurryMarked(marks, "gen1-exited") {
		t.Fatal("generation 1 is gone without exiting on a second drain signal: it was killed")
	}
	waitHurryMark(t, marks, "gen2-term1")
	g := genOf(p.status(), 2)
	if g == nil || len(g.Workers) != 1 || g.State != supervise.GenDraining {
		t.Fatalf("generation 2 %+v, want its worker draining (within the cap)", g)
	}
	// Had it been hurried, its signal would have gone with generation 1's,
	// whose mark is long written.
	if hurryMarked(marks, "gen2-term2") {
		t.Fatal("generation 2, within the cap, was sent the drain signal a second time")
	}
	if code := p.stop(syscall.SIGQUIT, 30*time.Second); code != 0 {
		t.Fatalf("fast stop exited %d", code)
	}
}

// A worker that ignores the second drain signal too is killed after the
// short grace, long before its drain timeout; the generation within the
// cap is not.
func TestMaxDrainingKillsTheOldestAfterTheGrace(t *testing.T) {
	p, marks := startHurry(t, "ignore")
	gen1Gone(t, p)
	if hurryMarked(marks, "gen1-exited") {
		t.Fatal("the worker exited by itself; it should ignore every drain signal")
	}
	waitHurryMark(t, marks, "gen2-term1")
	if g := genOf(p.status(), 2); g == nil || len(g.Workers) != 1 || g.State != supervise.GenDraining {
		t.Fatalf("generation 2 %+v, want its worker draining (within the cap)", g)
	}
	if hurryMarked(marks, "gen2-term2") {
		t.Fatal("generation 2, within the cap, was sent the drain signal a second time")
	}
	if code := p.stop(syscall.SIGQUIT, 30*time.Second); code != 0 {
		t.Fatalf("fast stop exited %d", code)
	}
}
