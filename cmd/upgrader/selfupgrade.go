package main

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"syscall"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/sockets"
	"github.com/seed6cb0314a/upgrader/internal/spawn"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// Roles of the fds main carries across a self-upgrade.
const (
	roleControl = "control"
	roleHealth  = "health"
)

// carry returns the Config.Carry of a supervisor whose control socket is
// cl and health listener hl (either may be nil): close-on-exec duplicates
// taken through SyscallConn, so the listeners stay non-blocking.
func carry(cl, hl net.Listener) func() ([]supervise.CarriedFD, error) {
	return func() ([]supervise.CarriedFD, error) {
		var out []supervise.CarriedFD
		for _, l := range []struct {
			role string
			l    net.Listener
		}{{roleControl, cl}, {roleHealth, hl}} {
			if l.l == nil {
				continue
			}
			sc, ok := l.l.(syscall.Conn)
			if !ok {
				return out, fmt.Errorf("%s listener: no fd", l.role)
			}
			fd, err := sockets.DupFD(sc)
			if err != nil {
				return out, fmt.Errorf("%s listener: %w", l.role, err)
			}
			out = append(out, supervise.CarriedFD{Role: l.role, FD: fd})
		}
		return out, nil
	}
}

// fileListener takes over fd, a listener carried across the exec.
func fileListener(fd int, role string) (net.Listener, error) {
	if fd < 0 {
		return nil, nil
	}
	f := os.NewFile(uintptr(fd), role)
	defer f.Close()
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("%s listener carried across the self-upgrade (fd %d): %w", role, fd, err)
	}
	if ul, ok := l.(*net.UnixListener); ok {
		ul.SetUnlinkOnClose(true) // as the listener Listen bound would
	}
	return l, nil
}

// resumeRun is run in the new image of a self-upgrade: it restores
// everything from the state record at fd stateFD instead of binding
// listeners and starting generation 1. cfg is the flags' configuration.
func resumeRun(f runFlags, cfg supervise.Config, stateFD string) error {
	os.Unsetenv(supervise.StateEnv)
	fd, err := strconv.Atoi(stateFD)
	if err != nil || fd < 3 {
		return fmt.Errorf("%s=%q: not an fd", supervise.StateEnv, stateFD)
	}
	st, err := supervise.LoadState(fd)
	if err != nil {
		return err
	}
	// The carried fds had close-on-exec cleared for the exec: set it on
	// every fd again, so that none leaks into a worker.
	if err := spawn.CloseOnExecFrom(3); err != nil {
		return err
	}
	log, err := newLogger(f.logFormat, f.logLevel)
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	defer log.Sync()
	cfg.Logger = slogOf(log)
	cfg.Executable, cfg.Args = st.Executable, st.Args
	cfg.Listeners = st.Restored()
	for _, l := range cfg.Listeners {
		defer l.Close()
	}
	ownListeners(log, f.listen, cfg.Listeners)
	cl, err := fileListener(st.CarriedFD(roleControl), roleControl)
	if err != nil {
		return err
	}
	if cl != nil {
		defer cl.Close()
	}
	hl, err := fileListener(st.CarriedFD(roleHealth), roleHealth)
	if err != nil {
		return err
	}
	cfg.Carry = carry(cl, hl)
	sup, err := supervise.Restore(cfg, st)
	if err != nil {
		return configError(err)
	}
	log.Info("resuming after a self-upgrade", zap.String("version", version), zap.Int("exec", st.Execs),
		zap.Int("listeners", len(cfg.Listeners)))
	return serve(log, f, sup, cl, hl)
}

// dupConnFD returns a close-on-exec duplicate of c's fd (-1 if it has none).
func dupConnFD(c net.Conn) int {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1
	}
	fd, err := sockets.DupFD(sc)
	if err != nil {
		return -1
	}
	return fd
}

func closeFD(fd int) {
	if fd >= 0 {
		unix.Close(fd)
	}
}

// ownListeners marks the carried listeners named by a --listen value as
// upgrader's own (the state record does not say; a socket-activated one is
// not), so that a stop may make them refuse new connections, and removes a
// stop's filter from them.
func ownListeners(log *zap.Logger, listen []string, ls []*supervise.Listener) {
	specs, err := parseListeners(listen, nil)
	if err != nil {
		return
	}
	names := map[string]bool{}
	for _, spec := range specs {
		names[spec.Name] = true
	}
	for _, l := range ls {
		if sock := l.Socket(); names[sock.Spec.Name] {
			sock.Own = true
			takeNewConnections(log, sock)
		}
	}
}
