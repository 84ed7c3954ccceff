package supervise

import (
	"os"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/sdnotify"
	"github.com/seed6cb0314a/upgrader/internal/sockets"
)

// storedFD is one fd in the fd store.
type storedFD struct {
	name string
	fd   int
}

// onFDStore keeps or removes fds as systemd's fd store does (sd_notify(3),
// sd_pid_notify_with_fds(3)): FDSTORE=1 keeps the fds that came with the
// message under FDNAME (default "stored"), up to Config.FDStoreMax;
// FDSTOREREMOVE=1 with FDNAME removes every fd of that name. Unlike
// systemd, stored fds are not polled for hangup (as with FDPOLL=0).
func (s *Supervisor) onFDStore(w *worker, m sdnotify.Message, files []*os.File) {
	log := s.log.With(zap.Int("generation", w.gen.n), zap.Int("pid", w.pid))
	name, named := m.Get("FDNAME")
	if named && !sockets.ValidName(name) {
		log.Warn("fd store: FDNAME is not a valid fd name (printable ASCII, no ':', at most 255), ignored", zap.String("fdname", name))
		return
	}
	if m.Is("FDSTOREREMOVE", "1") {
		if !named {
			log.Warn("fd store: FDSTOREREMOVE=1 without FDNAME=, ignored")
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
		log.Info("fd store: removed", zap.String("fdname", name), zap.Int("fds", len(s.fdStore)-len(kept)))
		s.fdStore = kept
		return
	}
	if !named {
		name = "stored"
	}
	if len(files) == 0 {
		log.Warn("fd store: FDSTORE=1 without fds, ignored")
		return
	}
	for _, f := range files {
		if len(s.fdStore) >= s.cfg.FDStoreMax {
			log.Warn("fd store full, fd not kept", zap.String("fdname", name), zap.Int("max", s.cfg.FDStoreMax))
			continue
		}
		fd, err := sockets.DupFD(f)
		if err != nil {
			log.Warn("fd store: cannot keep fd", zap.Error(err))
			continue
		}
		s.fdStore = append(s.fdStore, storedFD{name: name, fd: fd})
	}
	log.Info("fd store: kept", zap.String("fdname", name), zap.Int("fds", len(files)), zap.Int("stored", len(s.fdStore)))
}
