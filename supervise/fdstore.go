package supervise

import (
	"os"

	"golang.org/x/sys/unix"
	"log/slog"

	"github.com/seed6cb0314a/upgrader/internal/sdnotify"
	"github.com/seed6cb0314a/upgrader/internal/sockets"
)

// storedFD is one fd in the fd store.
type storedFD struct {
	name string
	fd   int
}

// fdStore holds the fds workers stored with FDSTORE=1, passed to every
// later worker after the listeners.
type fdStore []storedFD

func (st fdStore) names() []string {
	out := []string{}
	for _, f := range st {
		out = append(out, f.name)
	}
	return out
}

func (st fdStore) closeAll() {
	for _, f := range st {
		unix.Close(f.fd)
	}
}

// onFDStore keeps or removes fds as systemd's fd store does (sd_notify(3),
// sd_pid_notify_with_fds(3)): FDSTORE=1 keeps the fds that came with the
// message under FDNAME (default "stored"), up to Config.FDStoreMax (0: the
// store is off, and the notify socket takes no fds at all);
// FDSTOREREMOVE=1 with FDNAME removes every fd of that name. Unlike
// systemd, stored fds are not polled for hangup (as with FDPOLL=0).
func (s *Supervisor) onFDStore(w *worker, m sdnotify.Message, files []*os.File) {
	log := s.log.With(slog.Int("generation", w.gen.N), slog.Int("pid", w.Pid))
	name, named := m.Get("FDNAME")
	if named && !sockets.ValidName(name) {
		s.warn(w.Pid, "fd store: FDNAME is not a valid fd name (printable ASCII, no ':', at most 255), ignored",
			slog.Int("pid", w.Pid), slog.String("fdname", name))
		return
	}
	if m.Is("FDSTOREREMOVE", "1") {
		if !named {
			s.warn(w.Pid, "fd store: FDSTOREREMOVE=1 without FDNAME=, ignored", slog.Int("pid", w.Pid))
			return
		}
		kept := s.fdStore[:0]
		for _, st := range s.fdStore {
			if st.name == name {
				unix.Close(st.fd)
				continue
			}
			kept = append(kept, st)
		}
		log.Info("fd store: removed", slog.String("fdname", name), slog.Int("fds", len(s.fdStore)-len(kept)))
		s.fdStore = kept
		return
	}
	if !named {
		name = "stored"
	}
	if len(files) == 0 {
		s.warn(w.Pid, "fd store: FDSTORE=1 without fds (or the store is off), ignored", slog.Int("pid", w.Pid))
		return
	}
	// One line per message, never one per fd: a flood of fds must not
	// become a flood of log lines.
	kept, full := 0, 0
	var dupErr error
	for _, f := range files {
		if len(s.fdStore) >= s.cfg.FDStoreMax {
			full++
			continue
		}
		fd, err := sockets.DupFD(f)
		if err != nil {
			dupErr = err
			continue
		}
		s.fdStore = append(s.fdStore, storedFD{name: name, fd: fd})
		kept++
	}
	if kept < len(files) {
		s.warn(w.Pid, "fd store: fds not kept", slog.Int("pid", w.Pid), slog.String("fdname", name),
			slog.Int("kept", kept), slog.Int("over_max", full), slog.Int("max", s.cfg.FDStoreMax), slog.Any("dup_error", dupErr))
	}
	if kept > 0 {
		log.Info("fd store: kept", slog.String("fdname", name), slog.Int("fds", kept), slog.Int("stored", len(s.fdStore)))
	}
}
