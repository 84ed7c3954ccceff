package inherit

import (
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/seed6cb0314a/upgrader/internal/proctree"
)

// tableflip starts the new process in this one's process group and, when
// it is not ready in time, kills that process alone: whatever it started
// (a background job, a daemon in a session of its own) would outlive it,
// reparented to init. A childWatch follows the tree of the new process
// while it starts, from the process table, so that the upgrade timeout,
// or a cancel, kills all of it: the new process, every process seen below
// it (setsid does not hide a process from its parent while the parent
// lives), and every process started since that inherited the upgrade's
// UPGRADER_EMBEDDED_GENERATION (what left before a look saw it, unless it
// also dropped its environment: that much the parent cannot know).
// Its own timer runs the upgrade timeout; tableflip's is set later
// (tableflipGrace) so that this kill comes first.
type childWatch struct {
	self  int
	begin time.Time
	gen   string // the generation the new process's environment names
	bin   binID  // the binary it runs
	stop  chan struct{}
	done  chan struct{}

	mu     sync.Mutex
	child  proctree.Proc // zero until found
	before map[int]bool  // this process's children when the watch began
	seen   map[int]uint64
	killed string // why the tree was killed ("" not)
	ended  bool
}

// tableflipGrace puts tableflip's own upgrade timeout after the watch's.
const tableflipGrace = 5 * time.Second

// watchInterval is how often the starting tree is looked at.
const watchInterval = 20 * time.Millisecond

// binID tells one binary on disk from another: a deploy renames a new file
// over the old one (a new inode), or rewrites it (a new size or mtime).
type binID struct {
	dev, ino uint64
	size     int64
	mtime    time.Time
}

// currentBinary identifies the binary tableflip will start: os.Args[0],
// looked up as tableflip does, symlinks followed.
func currentBinary() binID {
	path, err := exec.LookPath(os.Args[0])
	if err != nil {
		return binID{}
	}
	fi, err := os.Stat(path)
	if err != nil {
		return binID{}
	}
	id := binID{size: fi.Size(), mtime: fi.ModTime()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		id.dev, id.ino = uint64(st.Dev), st.Ino
	}
	return id
}

// watchChild starts following the process the next tableflip upgrade
// starts, for generation gen, and kills its tree once timeout has passed.
func watchChild(gen int, timeout time.Duration) *childWatch {
	w := &childWatch{self: os.Getpid(), begin: time.Now(), gen: strconv.Itoa(gen), bin: currentBinary(),
		stop: make(chan struct{}), done: make(chan struct{}), before: map[int]bool{}, seen: map[int]uint64{}}
	if tab, err := proctree.Read("/proc"); err == nil {
		for pid, p := range tab {
			if p.PPid == w.self {
				w.before[pid] = true
			}
		}
	}
	go w.run(timeout)
	return w
}

func (w *childWatch) run(timeout time.Duration) {
	defer close(w.done)
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(watchInterval)
	defer tick.Stop()
	for {
		w.look()
		select {
		case <-w.stop:
			return
		case <-deadline.C:
			w.kill("timed out: the new process was not ready within " + timeout.String())
			return
		case <-tick.C:
		}
	}
}

// look records the new process and its descendants as they are now.
func (w *childWatch) look() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.lookLocked()
}

func (w *childWatch) lookLocked() {
	tab, err := proctree.Read("/proc")
	if err != nil {
		return
	}
	if w.child.Pid == 0 {
		for pid, p := range tab {
			if p.PPid == w.self && !w.before[pid] && p.State != 'Z' && w.marked(pid, p) {
				w.child = p
			}
		}
	}
	if w.child.Pid == 0 {
		return
	}
	for _, pid := range tab.Descendants(w.child.Pid) {
		w.seen[pid] = tab[pid].StartTicks
	}
}

// marked reports whether p, started since the watch began, inherited the
// upgrade's generation: the new process, or something it started.
func (w *childWatch) marked(pid int, p proctree.Proc) bool {
	if pid == w.self || (!p.Started.IsZero() && p.Started.Before(w.begin.Add(-10*time.Millisecond))) {
		return false
	}
	return proctree.Environ("/proc", pid)[EmbeddedGenerationEnv] == w.gen
}

// kill kills the new process's whole tree (once), and says why: the
// upgrade then fails with that reason.
func (w *childWatch) kill(why string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ended || w.killed != "" {
		return
	}
	w.killed = why
	// A kill that comes between two looks (a cancel a few ms after the
	// start) must find what the last look could not see yet.
	w.lookLocked()
	w.killTree()
}

// killTree SIGKILLs every process of the new process's tree still there
// (under w.mu). A pid is killed only if it still is the process seen (its
// start time): pids are reused.
func (w *childWatch) killTree() {
	tab, err := proctree.Read("/proc")
	if err != nil {
		return
	}
	doomed := map[int]bool{}
	if c, ok := tab[w.child.Pid]; ok && w.child.Pid != 0 && c.StartTicks == w.child.StartTicks {
		doomed[c.Pid] = true
		for _, pid := range tab.Descendants(c.Pid) {
			doomed[pid] = true
		}
	}
	for pid, start := range w.seen {
		if p, ok := tab[pid]; ok && p.StartTicks == start {
			doomed[pid] = true
			for _, q := range tab.Descendants(pid) {
				doomed[q] = true
			}
		}
	}
	below := map[int]bool{}
	for _, pid := range tab.Descendants(w.self) {
		below[pid] = true
	}
	for pid, p := range tab {
		// An orphan that inherited the generation; not this process's own
		// children of the moment (the host's exec.Cmd inherit it too).
		if !doomed[pid] && !below[pid] && p.State != 'Z' && w.marked(pid, p) {
			doomed[pid] = true
		}
	}
	for pid := range doomed {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// end stops the watch once the upgrade has returned; failed: what is left
// of the new process's tree is killed (it crashed, or tableflip killed it).
// It returns why the watch killed the tree, if it did.
func (w *childWatch) end(failed bool) string {
	close(w.stop)
	<-w.done
	if failed {
		w.look() // the last, for what the new process started since
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if failed && w.killed == "" {
		w.killTree()
	}
	w.ended = true
	return w.killed
}
