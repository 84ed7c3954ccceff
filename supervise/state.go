package supervise

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
)

// WorkerState is where a worker is in its life. Transitions:
// starting → ready → draining → exited; starting → draining (failed or
// stopped generation); any → exited.
type WorkerState string

const (
	WorkerStarting WorkerState = "starting"
	WorkerReady    WorkerState = "ready"
	WorkerDraining WorkerState = "draining"
	WorkerExited   WorkerState = "exited"
)

// GenerationState is where a generation is. Transitions: starting → active
// (all workers ready) → draining (a newer one became active, or stop) →
// exited; starting → failed (a worker exited or timed out before ready) →
// exited.
type GenerationState string

const (
	GenStarting GenerationState = "starting"
	GenActive   GenerationState = "active"
	GenDraining GenerationState = "draining"
	GenFailed   GenerationState = "failed"
	GenExited   GenerationState = "exited"
)

type worker struct {
	gen     *generation
	slot    int
	pid     int // of its main process
	state   WorkerState
	started time.Time
	readyAt time.Time
	status  string // last STATUS= line
	// readyTimeout is the bound on becoming ready, as EXTEND_TIMEOUT_USEC
	// last set it (< 0: none).
	readyTimeout time.Duration
	asked        bool   // retired: its exit is not a crash
	cause        string // why it was retired
	killed       bool   // its tree was sent SIGKILL (at killedAt)
	killedAt     time.Time
	// exited: its main process was reaped; lingering lists what is left of
	// its process tree (lingerSignalled: and was sent the drain signal);
	// gone: nothing is left, the worker is forgotten.
	exited          bool
	lingering       []int
	lingerSignalled bool
	gone            bool
	// The one deadline timer (arm), due at deadline (zero: disarmed);
	// timerSeq tells a stale firing apart.
	timer    *time.Timer
	timerSeq uint64
	deadline time.Time
	// hurried: its generation was beyond --max-draining, and it was sent
	// the drain signal a second time with its deadline pulled in (hurry).
	hurried  bool
	lastPing time.Time // last WATCHDOG=1
	// The handoff channel: hsock, with out queueing what is sent on it
	// (writeHandoff). A target that does not take its batches is stalled
	// and skipped; unanswered counts batches forwarded to it awaiting an
	// answer.
	hsock      *handoff.Socket
	out        chan *outMsg // batches
	answers    chan *outMsg // ACK and NAK
	stalled    bool
	unanswered int
	accepts    map[string]bool // handoff kinds it takes (ACCEPT)
}

type generation struct {
	n       int
	state   GenerationState
	started time.Time
	readyAt time.Time
	// slots holds the worker serving each slot; nil while a crashed
	// worker's replacement waits out its backoff.
	slots []*worker
	// live is every process of this generation still running, including
	// workers that left their slot (self-stopped, replaced).
	live     map[*worker]struct{}
	failures []int // consecutive crash count per slot, for the backoff
	restarts int
	reason   string // why it failed
	// watchers follow the upgrade that started this generation;
	// exitWatchers, moved here when a newer one replaced it, are told
	// "done" when this generation has exited.
	watchers     []chan Progress
	exitWatchers []chan Progress
	replacedBy   int
}

func (g *generation) allReady() bool {
	for _, w := range g.slots {
		if w == nil || w.state != WorkerReady {
			return false
		}
	}
	return true
}

// anyUnhurried reports whether a worker of g with processes left has not
// been hurried yet.
func (g *generation) anyUnhurried() bool {
	for w := range g.live {
		if !w.hurried {
			return true
		}
	}
	return false
}

func (g *generation) readyCount() int {
	n := 0
	for _, w := range g.slots {
		if w != nil && w.state == WorkerReady {
			n++
		}
	}
	return n
}

// describeExit renders a wait status as "exited with status 1" or "killed by
// signal KILL".
func describeExit(ws unix.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("exited with status %d", ws.ExitStatus())
	case ws.Signaled():
		name := unix.SignalName(ws.Signal())
		if name == "" {
			name = fmt.Sprint(int(ws.Signal()))
		}
		return "killed by signal " + name
	}
	return fmt.Sprintf("ended with wait status %#x", uint32(ws))
}
