package supervise

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// WorkerState is where a worker is in its life; a worker's state changes
// in one place, setState (worker.go). Transitions:
//
//	starting → ready → draining → lingering → gone
//	starting → draining (its generation failed, or the supervisor stops)
//	starting, ready → lingering or gone (it exited unasked: a crash)
//	draining → gone (its whole tree exited at once)
type WorkerState string

const (
	// WorkerStarting: its main process runs and has not said it is ready.
	WorkerStarting WorkerState = "starting"
	// WorkerReady: it said it serves (READY=1, its ready fd, its delay).
	WorkerReady WorkerState = "ready"
	// WorkerDraining: it was asked to stop (the drain signal, or none when
	// it stops on its own), and its main process still runs.
	WorkerDraining WorkerState = "draining"
	// WorkerLingering: its main process was reaped; what is left of its
	// process tree was sent the drain signal and is killed at its deadline.
	WorkerLingering WorkerState = "lingering"
	// WorkerGone: nothing of its tree is left; it is forgotten.
	WorkerGone WorkerState = "gone"
)

// running reports whether the worker's main process still runs.
func (s WorkerState) running() bool {
	return s == WorkerStarting || s == WorkerReady || s == WorkerDraining
}

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

// WorkerRecord is the persistent part of a worker: what Status shows of
// it and what a self-upgrade carries to the new image. The runtime's
// worker embeds it, so a field added here is carried and shown with no
// copy by hand. Times are wall-clock (their monotonic part does not
// survive an exec); durations are in nanoseconds in JSON.
type WorkerRecord struct {
	Slot    int         `json:"worker"`
	Pid     int         `json:"pid"` // of its main process
	State   WorkerState `json:"state"`
	Started time.Time   `json:"started"`
	ReadyAt time.Time   `json:"ready_at,omitzero"`
	Status  string      `json:"status,omitempty"` // the last STATUS= it sent
	// ReadyTimeout bounds its becoming ready, as EXTEND_TIMEOUT_USEC last
	// set it (< 0: no bound).
	ReadyTimeout time.Duration `json:"ready_timeout_ns"`
	// Cause is why it was asked to stop (empty: never asked).
	Cause string `json:"cause,omitempty"`
	// KilledAt is when its tree was first sent SIGKILL (zero: never).
	KilledAt time.Time `json:"killed_at,omitzero"`
	// Lingering lists what is left of its process tree once its main
	// process has exited; LingerSignalled: they were sent the drain signal.
	Lingering       []int `json:"lingering,omitempty"`
	LingerSignalled bool  `json:"linger_signalled,omitempty"`
	// Stray: not a worker the supervisor started but an orphan reparented
	// to it that nothing names a worker of (trees.go, adoptStray); its Pid
	// is the orphan's, its Slot -1, and it lingers from the start.
	Stray bool `json:"stray,omitempty"`
	// Hurried: its generation was beyond MaxDraining, so it was sent the
	// drain signal again with its deadline pulled in to HurryGrace.
	Hurried  bool      `json:"hurried,omitempty"`
	LastPing time.Time `json:"last_ping,omitzero"` // the last WATCHDOG=1
	// Accepts are the handoff kinds it takes (its ACCEPT message).
	Accepts map[string]bool `json:"accepts,omitempty"`
	// Deadline is when its one timer fires (zero: disarmed): the ready
	// timeout while it starts, the watchdog while ready, the drain
	// deadline while it drains or lingers.
	Deadline time.Time `json:"deadline,omitzero"`
}

// GenerationRecord is the persistent part of a generation, embedded by the
// runtime's generation as WorkerRecord is by a worker.
type GenerationRecord struct {
	N       int             `json:"generation"`
	State   GenerationState `json:"state"`
	Started time.Time       `json:"started"`
	ReadyAt time.Time       `json:"ready_at,omitzero"`
	// Restarts counts its crash restarts; Failures the consecutive crashes
	// per slot, for the backoff.
	Restarts int    `json:"restarts"`
	Failures []int  `json:"failures,omitempty"`
	Reason   string `json:"reason,omitempty"` // why it failed
	// ReplacedBy is the generation that replaced it (0: none yet).
	ReplacedBy int `json:"replaced_by,omitempty"`
}

// worker is a WorkerRecord with what lives only in this process: its
// generation, its timer and its handoff channel.
type worker struct {
	WorkerRecord
	gen *generation
	// The one deadline timer (arm); timerSeq tells a stale firing apart.
	timer    stopper
	timerSeq uint64
	// idle: started under SCHED_IDLE (Config.StartIdle), until its ready
	// or idleTimer's end (idleMax), which is stopped then: a pending timer
	// keeps the worker, its channels and their buffers.
	idle      bool
	idleTimer stopper
	// channelInodes are the inodes of its ends of its channels (handoff,
	// Node IPC), which its connection count leaves out.
	channelInodes []string
	// Its open channels (the handoff channel, Node's IPC channel), and
	// takeOn, the one it last sent ACCEPT on, where batches for it go. A
	// target that does not take its batches is stalled and skipped;
	// unanswered counts batches forwarded to it awaiting an answer.
	chans      []*wchan
	takeOn     *wchan
	stalled    bool
	unanswered int
}

// asked reports whether w was asked to stop, so that its exit is expected.
func (w *worker) asked() bool { return w.Cause != "" }

// generation is a GenerationRecord with its workers and its watchers.
type generation struct {
	GenerationRecord
	// slots holds the worker serving each slot; nil while a crashed
	// worker's replacement waits out its backoff.
	slots []*worker
	// live is every worker of this generation not yet gone, including
	// those that left their slot (self-stopped, replaced).
	live map[*worker]struct{}
	// watchers follow the upgrade that started this generation;
	// exitWatchers, moved here when a newer one replaced it, are told
	// "done" when this generation has exited.
	watchers     []chan Progress
	exitWatchers []chan Progress
	// count is the count of the replaced generation's connections, for
	// watchers, begun as this generation started (startCount).
	count *connCount
	// holding: every worker is ready and the ready hold runs (hold, its
	// timer) before the generation is promoted.
	holding bool
	hold    stopper
}

// stopHold stops g's ready hold, if one runs.
func (g *generation) stopHold() {
	if g.hold != nil {
		g.hold.Stop()
	}
	g.holding, g.hold = false, nil
}

func (g *generation) allReady() bool {
	for _, w := range g.slots {
		if w == nil || w.State != WorkerReady {
			return false
		}
	}
	return true
}

// drainsByContract tells whether every live worker of g takes handoffs
// (it sent ACCEPT): a worker built on drain or the Node.js module, or one
// that follows the handoff protocol, which answers what it has accepted
// when asked to drain rather than dropping it as a plain server's own
// shutdown may (steer.go). False for a generation with no live worker.
func (g *generation) drainsByContract() bool {
	for w := range g.live {
		if w.Accepts == nil {
			return false
		}
	}
	return len(g.live) > 0
}

// anyUnhurried reports whether a worker of g with processes left has not
// been hurried yet.
func (g *generation) anyUnhurried() bool {
	for w := range g.live {
		if !w.Hurried {
			return true
		}
	}
	return false
}

func (g *generation) readyCount() int {
	n := 0
	for _, w := range g.slots {
		if w != nil && w.State == WorkerReady {
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
