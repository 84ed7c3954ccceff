package inherit

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
)

// Embedded mode: the process upgrades itself with tableflip
// (github.com/cloudflare/tableflip) instead of being run by upgrader. The
// Set keeps every socket it hands out in tableflip's Fds, under a name of
// its own, so that the next process gets them with their LISTEN_FDNAMES
// names; and it passes that process one end of a fresh handoff channel
// (docs/reference/handoff.md) among the same files, through which the draining
// process hands over its live connections directly, with no upgrader in
// between: the new process answers ACK or NAK itself.
const (
	// embedSockPrefix starts the tableflip name of a socket passed on:
	// "upgrader-sock:<n>:<LISTEN_FDNAMES name>", n keeping the names unique
	// and the order.
	embedSockPrefix = "upgrader-sock:"
	// embedHandoffName is the tableflip name of the child's end of the
	// handoff channel.
	embedHandoffName = "upgrader-handoff"
	// EmbeddedGenerationEnv carries the generation number from a process
	// to the one it upgrades to (Generation). New reads it and unsets it.
	EmbeddedGenerationEnv = "UPGRADER_EMBEDDED_GENERATION"
)

// WithUpgrades turns on embedded mode: the process upgrades itself on
// SIGUSR2 or SIGHUP with tableflip (opts: UpgradeTimeout, how long the new
// process may take to become ready, default one minute; PIDFile, written
// by every process once ready), live connections included. A new process
// not ready in time is killed with its whole tree (childtree.go). It is ignored
// when the process runs under upgrader (UPGRADER_GENERATION is set), which
// does the upgrades itself, so the same binary runs both ways. See the
// package documentation, "Embedded upgrades".
func WithUpgrades(opts tableflip.Options) Option {
	return func(s *Set) { s.upgradeOpts = &opts }
}

// current is the process's embedded mode, if any: tableflip allows one
// Upgrader per process, so Ready, Notify and Upgraded, which are
// process-wide, consult it.
var current atomic.Pointer[embedded]

type embedded struct {
	set      *Set
	upg      *tableflip.Upgrader
	gen      int
	nextSock int // the next n of embedSockPrefix (under set.mu)
	upgraded chan struct{}
	done     atomic.Bool // upgraded is closed
	// peer keeps open the far end of the first process's handoff channel,
	// which no parent holds, so that the channel stays open (and its
	// listeners with it) until the process exits.
	peer *os.File
	// out is the channel to the process this one upgraded to (under set.mu).
	out *Handoffs
	// watch follows the new process of the upgrade under way, if any.
	watch atomic.Pointer[childWatch]
}

// newEmbedded starts embedded mode for s, taking the fds a tableflip
// parent passed (or, in the first process, importing systemd's from
// s.files so that they pass on).
func newEmbedded(s *Set) error {
	// The upgrade's own watch (childWatch) kills a new process that is
	// late, with its whole tree; tableflip's timeout, which would kill the
	// process alone, comes after it.
	opts := *s.upgradeOpts
	opts.UpgradeTimeout = s.upgradeTimeout() + tableflipGrace
	upg, err := tableflip.New(opts)
	if err != nil {
		return fmt.Errorf("embedded upgrades: %w", err)
	}
	e := &embedded{set: s, upg: upg, gen: 1, upgraded: make(chan struct{})}
	if v, ok := os.LookupEnv(EmbeddedGenerationEnv); ok {
		os.Unsetenv(EmbeddedGenerationEnv)
		if n, err := strconv.Atoi(v); err == nil && n > 0 {
			e.gen = n
		}
	}
	if upg.HasParent() {
		if err := e.takeFromParent(); err != nil {
			upg.Stop()
			return err
		}
	} else {
		for _, f := range s.files {
			if err := e.pass(f.Name(), f); err != nil {
				upg.Stop()
				return err
			}
		}
	}
	current.Store(e)
	s.emb = e
	// Asked for here, not in the goroutine: the PID file that tells an
	// operator (or a test) this process may be signalled is written by
	// Ready, which may come before a goroutine has run, and until then the
	// Go runtime drops SIGUSR2 (os/signal).
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGUSR2, syscall.SIGHUP)
	go e.signals(sigs)
	return nil
}

// takeFromParent takes every fd the tableflip parent passed: the sockets,
// in their order and under their names, and the handoff channel. tableflip
// keeps its own copies, which go on to the next process.
func (e *embedded) takeFromParent() error {
	files, err := e.upg.Fds.Files()
	if err != nil {
		return fmt.Errorf("embedded upgrades: fds from the parent process: %w", err)
	}
	type sock struct {
		n    int
		name string
		f    *os.File
	}
	var socks []sock
	for _, f := range files {
		// tableflip names a file "fd:<name>:".
		name := strings.TrimSuffix(strings.TrimPrefix(f.Name(), "fd:"), ":")
		switch {
		case name == embedHandoffName:
			fd := -1
			err := control(f, func(old int) (err error) {
				fd, err = unix.FcntlInt(uintptr(old), unix.F_DUPFD_CLOEXEC, 0)
				return err
			})
			f.Close()
			if err == nil {
				e.set.handoffFD = fd
			} else {
				e.set.handoffErr = fmt.Errorf("handoff channel from the parent process: %w", err)
			}
		case strings.HasPrefix(name, embedSockPrefix):
			rest := strings.TrimPrefix(name, embedSockPrefix)
			i := strings.IndexByte(rest, ':')
			n, err := strconv.Atoi(rest[:max(i, 0)])
			if i < 0 || err != nil {
				f.Close()
				continue
			}
			socks = append(socks, sock{n, rest[i+1:], f})
			e.nextSock = max(e.nextSock, n+1)
		default:
			f.Close() // not ours: the application's own AddFile, if any
		}
	}
	sort.Slice(socks, func(i, j int) bool { return socks[i].n < socks[j].n })
	for _, sk := range socks {
		nf, err := renamed(sk.f, sk.name)
		if err != nil {
			return fmt.Errorf("embedded upgrades: socket %q from the parent process: %w", sk.name, err)
		}
		e.set.files = append(e.set.files, nf)
		e.set.used = append(e.set.used, false)
	}
	return nil
}

// renamed returns a close-on-exec copy of f called name, and closes f.
func renamed(f *os.File, name string) (*os.File, error) {
	defer f.Close()
	fd := -1
	err := control(f, func(old int) (err error) {
		fd, err = unix.FcntlInt(uintptr(old), unix.F_DUPFD_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), name), nil
}

// pass registers a socket with tableflip's Fds, so that every later
// process gets it under its name.
func (e *embedded) pass(name string, c syscall.Conn) error {
	e.set.mu.Lock()
	n := e.nextSock
	e.nextSock++
	e.set.mu.Unlock()
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(old uintptr) { fd, derr = unix.FcntlInt(old, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return err
	}
	if derr != nil {
		return fmt.Errorf("embedded upgrades: socket %q: %w", name, derr)
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	if err := e.upg.Fds.AddFile(embedSockPrefix+strconv.Itoa(n)+":"+name, f); err != nil {
		return fmt.Errorf("embedded upgrades: socket %q: %w", name, err)
	}
	return nil
}

// handoffChannel gives the first process (which has no parent) a channel
// of its own, whose far end it keeps: it receives nothing, but sends to
// its successors like any other.
func (e *embedded) handoffChannel() (int, error) {
	a, b, err := handoff.Pair()
	if err != nil {
		return -1, err
	}
	e.peer = b
	fd := -1
	err = control(a, func(old int) (err error) {
		fd, err = unix.FcntlInt(uintptr(old), unix.F_DUPFD_CLOEXEC, 0)
		return err
	})
	a.Close()
	return fd, err
}

// signals upgrades on SIGUSR2 and SIGHUP, one upgrade at a time; a signal
// that arrives during an upgrade waits for it (one at most). When the
// binary on disk is no longer the one the starting process runs, the
// signal also cancels that start (its tree killed at once): the operator
// has shipped a fix, and the broken process must not hold it back until
// its timeout.
func (e *embedded) signals(ch <-chan os.Signal) {
	next := make(chan os.Signal, 1)
	go func() {
		for sig := range next {
			if e.done.Load() {
				e.set.log.Info("upgrade signal ignored: this process has already upgraded and is draining", "signal", sig.String())
				continue
			}
			e.upgrade(sig)
		}
	}()
	for sig := range ch {
		if w := e.watch.Load(); w != nil && w.bin != currentBinary() {
			e.set.log.Warn("a new binary is in place: cancelling the upgrade to the one still starting", "signal", sig.String())
			w.kill("cancelled: a new binary was signalled while it started")
		}
		select {
		case next <- sig:
		default: // one waits already
		}
	}
}

// upgradeTimeout is how long a new process may take to become ready.
func (s *Set) upgradeTimeout() time.Duration {
	if t := s.upgradeOpts.UpgradeTimeout; t > 0 {
		return t
	}
	return tableflip.DefaultUpgradeTimeout
}

// upgrade runs one tableflip upgrade, passing the new process a fresh
// handoff channel. A failure is logged, and the process goes on serving.
func (e *embedded) upgrade(sig os.Signal) {
	embedMu.Lock()
	defer embedMu.Unlock()
	if e.done.Load() {
		return
	}
	log := e.set.log.With("signal", sig.String(), "generation", e.gen)
	fail := func(err error) {
		log.Error("upgrade failed; this process keeps serving", "error", err)
	}
	a, b, err := handoff.Pair()
	if err != nil {
		fail(err)
		return
	}
	// tableflip keeps its own copy of b until the next upgrade replaces it.
	err = e.upg.Fds.AddFile(embedHandoffName, b)
	b.Close()
	if err != nil {
		a.Close()
		fail(fmt.Errorf("passing the handoff channel: %w", err))
		return
	}
	sock, err := handoff.NewSocket(a)
	if err != nil {
		fail(err)
		return
	}
	sock.SetSendTimeout(SendTimeout)
	out, err := newHandoffs(sock, nil, e.set.log)
	if err != nil {
		fail(err)
		return
	}
	start := time.Now()
	if err := e.waitParent(log); err != nil {
		out.Close()
		fail(err)
		return
	}
	log.Info("upgrading: starting the new process")
	os.Setenv(EmbeddedGenerationEnv, strconv.Itoa(e.gen+1))
	watch := watchChild(e.gen+1, e.set.upgradeTimeout())
	e.watch.Store(watch)
	err = e.upg.Upgrade()
	for i := 0; err != nil && err.Error() == "parent hasn't exited" && i < 100; i++ {
		// WaitForParent has seen the parent go; tableflip's own loop
		// learns it a moment later.
		time.Sleep(10 * time.Millisecond)
		err = e.upg.Upgrade()
	}
	e.watch.Store(nil)
	if why := watch.end(err != nil); why != "" && err != nil {
		err = fmt.Errorf("%s (its process tree killed): %w", why, err)
	} else if why != "" {
		// It said ready as it was killed: tableflip counts the upgrade
		// done and takes no other, but nothing serves in the new process,
		// so this one must go on.
		os.Unsetenv(EmbeddedGenerationEnv)
		out.Close()
		log.Error("the new process was killed as it became ready; this process keeps serving, and can upgrade no more (restart it to)", "reason", why)
		return
	}
	os.Unsetenv(EmbeddedGenerationEnv)
	if err != nil {
		out.Close()
		fail(err)
		return
	}
	e.set.mu.Lock()
	e.out = out
	if h := e.set.handoffs; h != nil {
		h.out.Store(out)
	}
	e.set.mu.Unlock()
	e.done.Store(true)
	close(e.upgraded)
	log.Info("upgraded: the new process is ready; draining", "took", time.Since(start).String())
}

// waitParent waits until the process this one was upgraded from has
// exited (tableflip starts no upgrade before), at most the upgrade timeout.
func (e *embedded) waitParent(log *slog.Logger) error {
	if !e.upg.HasParent() {
		return nil
	}
	timeout := e.set.upgradeTimeout()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	waited := time.AfterFunc(100*time.Millisecond, func() {
		log.Info("upgrade waits for the previous process to finish its drain")
	})
	defer waited.Stop()
	if err := e.upg.WaitForParent(ctx); err != nil && ctx.Err() != nil {
		return fmt.Errorf("the previous process still drains after %s", timeout)
	}
	return nil
}

// ready is Ready in embedded mode: MAINPID and READY=1 to systemd (when
// NOTIFY_SOCKET is set), then tableflip's Ready, which writes the PID file
// and tells the parent, which then drains.
func (e *embedded) ready() error {
	if err := Notify(fmt.Sprintf("MAINPID=%d\n%s", os.Getpid(), "READY=1")); err != nil {
		return err
	}
	if err := e.upg.Ready(); err != nil {
		return fmt.Errorf("embedded upgrades: %w", err)
	}
	return nil
}

// Upgraded returns a channel closed once this process has upgraded to a
// new one in embedded mode (tableflip's Exit, once the new process is
// ready and the handoff channel to it in place): it must then drain and
// exit. drain.Serve starts its drain on it. Without embedded mode the
// channel is nil: it never fires.
func Upgraded() <-chan struct{} {
	if e := current.Load(); e != nil {
		return e.upgraded
	}
	return nil
}

// Upgraded is the package's Upgraded for this Set: nil unless it runs in
// embedded mode.
func (s *Set) Upgraded() <-chan struct{} {
	if s.emb == nil {
		return nil
	}
	return s.emb.upgraded
}

// Embedded reports whether the Set runs in embedded mode (WithUpgrades, not
// under upgrader).
func (s *Set) Embedded() bool { return s.emb != nil }

// Upgrade runs one embedded upgrade now, as SIGUSR2 does; it does nothing
// outside embedded mode. The outcome is logged.
func (s *Set) Upgrade() {
	if s.emb != nil {
		s.emb.upgrade(syscall.SIGUSR2)
	}
}

var embedMu sync.Mutex // serialises Set.Upgrade with the signal loop
