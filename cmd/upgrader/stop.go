package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	flag "github.com/spf13/pflag"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/control"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// stopEvent is the only line of the stop command's reply
// (docs/reference/control.md).
const stopEvent = "stopping"

// stopReply is the stop command's reply: the stop has begun.
type stopReply struct {
	Event string `json:"event"`
	Pid   int    `json:"pid"`
}

// stopRequest answers stop: the graceful stop SIGTERM would begin (not
// ready, --shutdown-delay, the drain), begun before the reply, so that a
// client that sees the reply knows the stop is under way. A stop already
// under way is not made fast, as a second SIGTERM would: ExecStop= and an
// operator may both ask.
func stopRequest(ctx context.Context, sup *supervise.Supervisor, log *zap.Logger, send func(any) error) error {
	st, err := sup.Status(ctx)
	if err != nil {
		return err // not running: the reply says so
	}
	if !st.Stopping {
		log.Info("graceful stop", zap.String("requested_by", "upgrader stop (control socket)"))
	}
	// Stop returns once Run has, which is when this process is about to
	// exit: it must not hold the reply back.
	go sup.Stop(context.Background())
	return send(stopReply{Event: stopEvent, Pid: os.Getpid()})
}

// stopCmd is `upgrader stop`: it asks the running upgrader for a graceful
// stop and returns once that upgrader has exited, so that systemd's
// ExecStop= can run it and the stop keeps its order (--shutdown-delay,
// then the drain) before systemd signals what is left. With no upgrader
// answering (the socket file absent, or left by one that was killed) it
// has nothing to stop: it says so on stderr and succeeds, for ExecStop=
// also runs when the main process is already gone.
func stopCmd(args []string) error {
	fs := flag.NewFlagSet("upgrader stop", flag.ContinueOnError)
	path := fs.String("control", "", "the supervisor's control socket (default upgrader.sock in the runtime directory)")
	timeout := fs.Duration("timeout", 5*time.Minute, "give up waiting for the supervisor to exit after this long (exit status 1)")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: stop takes no arguments, got %q", errUsage, fs.Args())
	}
	if *path == "" {
		*path = defaultControlPath()
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	c, err := control.Dial(ctx, *path)
	if errors.Is(err, control.ErrNoServer) {
		fmt.Fprintf(os.Stderr, "upgrader: stop: nothing to stop: %v\n", err)
		return nil
	}
	if err != nil {
		return err
	}
	defer c.Close()
	// The process to wait for is the one that listens on the socket, held
	// before asking, while it certainly runs: its pid cannot have been
	// reused by the time it exits.
	pid, pfd, err := peerProcess(c)
	if err != nil {
		return fmt.Errorf("control socket %s: %w", *path, err)
	}
	if pfd >= 0 {
		defer unix.Close(pfd)
	}
	began := false
	err = control.Exchange(ctx, c, *path, control.Request{Command: "stop"}, func(line []byte) error {
		var r stopReply
		if err := json.Unmarshal(line, &r); err != nil {
			return fmt.Errorf("control reply %q: %w", line, err)
		}
		began = began || r.Event == stopEvent
		return nil
	})
	switch {
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("stop: no answer from upgrader pid %d within --timeout %s", pid, *timeout)
	case err != nil:
		return fmt.Errorf("stop: %w", err)
	case !began:
		return fmt.Errorf("stop: upgrader pid %d closed the control connection without beginning a stop", pid)
	}
	fmt.Fprintf(os.Stderr, "upgrader: stop: upgrader pid %d is stopping; waiting for it to exit\n", pid)
	if err := waitExit(ctx, pid, pfd); err != nil {
		return fmt.Errorf("stop: upgrader pid %d still running after --timeout %s: %w", pid, *timeout, err)
	}
	fmt.Fprintf(os.Stderr, "upgrader: stop: upgrader pid %d has exited\n", pid)
	return nil
}

// peerProcess returns the pid of the process that listens at the other
// end of c (SO_PEERCRED, in this process's pid namespace) and a pidfd of
// it (-1 on kernels before 5.3, which have no pidfd_open).
func peerProcess(c net.Conn) (pid, pfd int, err error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0, -1, fmt.Errorf("not a Unix socket connection: %T", c)
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return 0, -1, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return 0, -1, err
	}
	if cerr != nil {
		return 0, -1, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	pid = int(cred.Pid)
	if pid <= 0 {
		return 0, -1, fmt.Errorf("SO_PEERCRED: pid %d: the server is in another pid namespace", pid)
	}
	pfd, err = unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ENOSYS) {
			return pid, -1, nil
		}
		return 0, -1, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	return pid, pfd, nil
}

// exitPoll is how often waitExit looks where it has no pidfd to wait on.
const exitPoll = 20 * time.Millisecond

// waitExit waits until process pid has exited (its pidfd pfd readable;
// with none, kill(pid, 0) failing) or ctx is done.
func waitExit(ctx context.Context, pid, pfd int) error {
	for {
		if pfd >= 0 {
			ms := -1 // no deadline: wait as long as it runs
			if dl, ok := ctx.Deadline(); ok {
				ms = int(max(0, time.Until(dl).Milliseconds()))
			}
			n, err := unix.Poll([]unix.PollFd{{Fd: int32(pfd), Events: unix.POLLIN}}, ms)
			switch {
			case errors.Is(err, unix.EINTR):
				continue
			case err != nil:
				return fmt.Errorf("poll pidfd: %w", err)
			case n > 0:
				return nil
			case ctx.Err() != nil:
				return ctx.Err()
			}
			continue // poll's timeout ended a little before the deadline
		}
		if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
			return nil
		}
		t := time.NewTimer(exitPoll)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}
