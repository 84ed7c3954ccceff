package supervise

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// upgradeReady upgrades h to a new single-worker generation, ready, and
// returns its worker's pid.
func (h *harness) upgradeReady() int {
	h.t.Helper()
	h.s.post(evSignal{unix.SIGUSR2})
	pid := h.started()
	h.ready(pid)
	return pid
}

// hurried reports, per generation, whether its worker is marked hurried.
func (h *harness) hurried() map[int]bool {
	h.t.Helper()
	out := map[int]bool{}
	for _, g := range h.status().Generations {
		for _, w := range g.Workers {
			out[g.N] = w.Hurried
		}
	}
	return out
}

// Beyond --max-draining the oldest draining generation is sent the drain
// signal once more and killed only if it is still there after the grace;
// one that exits on it is never killed, and no worker is hurried twice.
func TestOldestDrainingBeyondCapIsHurriedOnceThenKilled(t *testing.T) {
	// The grace is long enough for the test to post generation 1's exit
	// within it even on a loaded machine.
	const grace = 500 * time.Millisecond
	h := run(t, Config{MaxDraining: 1, DrainTimeout: time.Hour, HurryGrace: grace})
	g1 := h.started()
	h.ready(g1)
	g2 := h.upgradeReady()
	h.killed(g1, unix.SIGTERM)
	g3 := h.upgradeReady()
	h.killed(g2, unix.SIGTERM)
	h.killed(g1, unix.SIGTERM) // hurried: generations 1 and 2 drain, the cap is 1
	if got := h.hurried(); !got[1] || got[2] {
		t.Fatalf("hurried by generation %v, want 1 only", got)
	}
	h.exit(g1, 0) // it closed what was idle and exited
	h.noKill(grace + 200*time.Millisecond)

	g4 := h.upgradeReady() // now 2 is beyond the cap
	h.killed(g3, unix.SIGTERM)
	h.killed(g2, unix.SIGTERM)
	h.killed(g2, unix.SIGKILL) // still there after the grace
	if got := h.hurried(); !got[2] || got[3] {
		t.Fatalf("hurried by generation %v, want 2 only", got)
	}

	// Generation 2's SIGKILL has not been reaped yet: it is still beyond
	// the cap at the next upgrade, but is not signalled again.
	h.upgradeReady() // generation 5
	h.killed(g4, unix.SIGTERM)
	h.killed(g3, unix.SIGTERM)
	h.killed(g3, unix.SIGKILL)
}

// A worker whose drain deadline is nearer than the grace keeps it: being
// hurried never gives a worker more time.
func TestHurryNeverPostponesTheDrainDeadline(t *testing.T) {
	h := run(t, Config{MaxDraining: 1, DrainTimeout: 300 * time.Millisecond, HurryGrace: time.Hour})
	g1 := h.started()
	h.ready(g1)
	g2 := h.upgradeReady()
	h.killed(g1, unix.SIGTERM)
	h.upgradeReady()
	h.killed(g2, unix.SIGTERM)
	if got := h.hurried(); !got[1] {
		t.Fatalf("hurried by generation %v, want 1", got)
	}
	h.killed(g1, unix.SIGTERM)
	// At their drain deadlines, 1 ms or so apart, not an hour later.
	h.killedAll(unix.SIGKILL, g1, g2)
}
