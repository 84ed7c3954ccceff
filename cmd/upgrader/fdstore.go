package main

import (
	"errors"
	"fmt"
	"os"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/sockets"
)

// notifyWithFDs sends state to the service manager's $NOTIFY_SOCKET with
// fds attached (SCM_RIGHTS), as sd_pid_notify_with_fds(3) does; go-systemd's
// daemon.SdNotify cannot attach fds.
func notifyWithFDs(state string, fds []int) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return errors.New("no NOTIFY_SOCKET")
	}
	if path[0] != '/' && path[0] != '@' {
		return fmt.Errorf("NOTIFY_SOCKET=%s: only Unix socket paths and abstract names are supported", path)
	}
	s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(s)
	// unix.SockaddrUnix turns a leading '@' into an abstract address.
	if err := unix.Sendmsg(s, []byte(state), unix.UnixRights(fds...), &unix.SockaddrUnix{Name: path}, 0); err != nil {
		return fmt.Errorf("NOTIFY_SOCKET=%s: %w", path, err)
	}
	return nil
}

// storeListeners puts each of socks in the service manager's fd store
// (FDSTORE=1, FDNAME= its name), so that systemd keeps the listening
// sockets open while upgrader is restarted or has crashed, and passes them
// back at the next start (LISTEN_FDS), where adoptForSpecs takes them.
// Whether the unit allows a store (FileDescriptorStoreMax=) cannot be asked,
// so a failure is only logged at debug level.
func storeListeners(log *zap.Logger, socks []*sockets.Socket) {
	if os.Getenv("NOTIFY_SOCKET") == "" {
		return
	}
	for _, s := range socks {
		err := notifyWithFDs("FDSTORE=1\nFDNAME="+s.Spec.Name, []int{s.FD})
		log.Debug("fd store: listener sent to the service manager", zap.String("name", s.Spec.Name), zap.Error(err))
		if err == nil {
			s.KeepPath() // systemd may hand it back to the next upgrader
		}
	}
}

// adoptForSpecs takes, for each --listen spec, the inherited socket of the
// same name when it is bound as spec asks (Spec.Matches): that is a
// listener upgrader put in systemd's fd store in an earlier life, and
// adopting it keeps the socket, and the connections waiting in its backlog.
// An inherited socket with a --listen name that does not match (the address
// in the unit changed, say) is closed and removed from the store
// (FDSTOREREMOVE=1), and the spec is bound anew; so is a second socket of
// the same name. It returns, in spec order, the socket adopted for each spec
// (nil: bind it) and the inherited sockets whose names no spec has, which
// keep their socket-activation meaning.
func adoptForSpecs(log *zap.Logger, specs []sockets.Spec, inherited []*sockets.Socket) (adopted, rest []*sockets.Socket) {
	adopted = make([]*sockets.Socket, len(specs))
	index := map[string]int{}
	for i, spec := range specs {
		index[spec.Name] = i
	}
	removed := map[string]bool{}
	for _, sock := range inherited {
		i, ok := index[sock.Spec.Name]
		if !ok {
			rest = append(rest, sock)
			continue
		}
		err := specs[i].Matches(sock.FD)
		if err == nil && adopted[i] == nil {
			adopted[i] = &sockets.Socket{Spec: specs[i], FD: sock.FD, Own: true}
			takeNewConnections(log, adopted[i])
			continue
		}
		if err == nil {
			err = errors.New("a second inherited socket of that name")
		}
		log.Warn("inherited socket not adopted for --listen of the same name; closed, and the listener bound anew",
			zap.String("name", sock.Spec.Name), zap.String("network", sock.Spec.Network), zap.String("address", sock.Addr()),
			zap.String("listen", specs[i].String()), zap.NamedError("reason", err))
		unix.Close(sock.FD)
		if !removed[sock.Spec.Name] && os.Getenv("NOTIFY_SOCKET") != "" {
			removed[sock.Spec.Name] = true
			err := notifyWithFDs("FDSTOREREMOVE=1\nFDNAME="+sock.Spec.Name, nil)
			log.Debug("fd store: removal sent to the service manager", zap.String("name", sock.Spec.Name), zap.Error(err))
		}
	}
	return adopted, rest
}

// takeNewConnections removes the filter a stop put on sock
// (sockets.RefuseNewConnections) before it was adopted again: an upgrader
// that crashed or was stopped mid-drain left it in systemd's fd store, or
// a self-upgrade carried it. A socket still filtered would drop every new
// SYN for good.
func takeNewConnections(log *zap.Logger, sock *sockets.Socket) {
	if sock.Spec.Network == "unix" || !sock.Spec.Stream() {
		return
	}
	had, err := sockets.AcceptNewConnections(sock.FD)
	if err != nil {
		log.Warn("cannot remove a stop's filter from an adopted listener; it may refuse new connections",
			zap.String("name", sock.Spec.Name), zap.Error(err))
	} else if had {
		log.Info("adopted listener had a stop's filter on it (an earlier upgrader stopped or crashed while draining); removed",
			zap.String("name", sock.Spec.Name), zap.String("address", sock.Addr()))
	}
}
