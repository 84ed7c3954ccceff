// Package control is the wire protocol of upgrader's control socket: a Unix
// stream socket (mode 0600) on which a client sends one JSON request line
// and reads JSON reply lines until the server closes the connection.
//
//	→ {"command":"upgrade","wait":true}
//	← {"event":"started","generation":3}
//	← {"event":"ready","generation":3,"ready_after_ms":12}
//	← {"event":"draining","generation":3,"old_generation":2,"connections":4}
//	← {"event":"done","generation":3,"old_generation":2}
//
//	→ {"command":"status"}
//	← {…the status snapshot…}
//
//	→ {"command":"prestop"}
//	← {"event":"not_ready","wait_ms":5000}
//	← {"event":"done"}               (once --shutdown-delay has passed)
//
//	→ {"command":"stop"}
//	← {"event":"stopping","pid":3274} (a graceful stop has begun, as SIGTERM)
//
// A request that cannot be parsed gets one {"error":"…"} line naming it.
package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/seed6cb0314a/upgrader/internal/sockets"
)

// MaxRequestSize bounds a request line, in bytes.
const MaxRequestSize = 4096

// Request is what a client asks.
type Request struct {
	// Command is "upgrade", "status", "prestop" (not-ready now, ahead
	// of a stop; the reply comes when --shutdown-delay has passed) or
	// "stop" (a graceful stop, as SIGTERM; the reply comes once it began).
	Command string `json:"command"`
	// Wait, for upgrade, streams progress until the upgrade ends; without
	// it the server replies once the upgrade has been started.
	Wait bool `json:"wait,omitempty"`
	// Self, for upgrade, re-executes the upgrader binary on disk in place
	// (after checking it), then upgrades the workers unless SelfOnly.
	Self     bool `json:"self,omitempty"`
	SelfOnly bool `json:"self_only,omitempty"`
}

type connKey struct{}

// ConnFrom returns the connection a Handler's request came on (nil when
// ctx is not a Handler's): a self-upgrade carries it across its exec.
func ConnFrom(ctx context.Context) net.Conn {
	c, _ := ctx.Value(connKey{}).(net.Conn)
	return c
}

// Reply is an error line; other lines are command-specific JSON.
type Reply struct {
	Error string `json:"error,omitempty"`
}

// ParseRequest parses and checks one request line. The error names the
// input.
func ParseRequest(line []byte) (Request, error) {
	var r Request
	dec := json.NewDecoder(strings.NewReader(string(line)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return Request{}, fmt.Errorf("control request %.80q: not a JSON request object: %w", line, err)
	}
	if dec.More() {
		return Request{}, fmt.Errorf("control request %.80q: trailing data after the JSON object", line)
	}
	switch r.Command {
	case "upgrade", "status", "prestop", "stop":
		return r, nil
	case "":
		return Request{}, fmt.Errorf("control request %.80q: no command (want upgrade, status, prestop or stop)", line)
	}
	return Request{}, fmt.Errorf("control request %.80q: unknown command %q (want upgrade, status, prestop or stop)", line, r.Command)
}

// Handler answers one request by writing reply values to send.
type Handler func(ctx context.Context, r Request, send func(v any) error) error

// Listen binds the control socket at path with mode 0600, replacing a stale
// socket file (its upgrader was killed). When another upgrader answers there
// it refuses, with an error that names the path and the way out, instead of
// taking the socket over: that upgrader would lose its control socket for
// good. The error names the path.
func Listen(path string) (net.Listener, error) {
	if err := sockets.RemoveStale(path, true); err != nil {
		if errors.Is(err, sockets.ErrInUse) {
			return nil, inUse(path, err)
		}
		return nil, fmt.Errorf("--control %s: %w", path, err)
	}
	// Bind under a umask so the socket is never reachable by others, not
	// even between bind and chmod. Called at start-up, before any other
	// goroutine creates files.
	old := syscall.Umask(0o177)
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		// Another upgrader bound it between the probe and the bind.
		if errors.Is(err, syscall.EADDRINUSE) {
			return nil, inUse(path, err)
		}
		return nil, fmt.Errorf("--control %s: %w", path, err)
	}
	return l, nil
}

// inUse is the error for a control socket path that a live server holds;
// it says which upgrader when that server answers a status request.
func inUse(path string, cause error) error {
	who := "a server that does not answer status requests"
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var st struct {
		Pid int `json:"pid"`
	}
	if Do(ctx, path, Request{Command: "status"}, func(b []byte) error { return json.Unmarshal(b, &st) }) == nil && st.Pid > 0 {
		who = fmt.Sprintf("another upgrader (pid %d)", st.Pid)
	}
	return fmt.Errorf("--control %s: %s answers on this control socket; to run a second upgrader, give it its own with --control PATH (or --control none): %w",
		path, who, cause)
}

// Accept retries back off from minBackoff, doubling up to maxBackoff, as
// net/http's Server.Serve does.
const (
	minBackoff = 5 * time.Millisecond
	maxBackoff = time.Second
)

// requestTimeout bounds how long a client may take to send its request,
// and writeTimeout how long one reply line may wait for a client that does
// not read: a stuck client must not hold a goroutine and an fd for ever.
const (
	requestTimeout = 10 * time.Second
	writeTimeout   = 10 * time.Second
)

// MaxConns bounds the control connections served at once: each holds an
// fd and a goroutine until its request is answered (an upgrade --wait for
// the whole upgrade), and the supervisor's fds must stay free for its
// workers (supervise.Config.FDReserve counts these). One beyond it is
// answered with an error line and closed at once.
const MaxConns = 32

// Serve answers requests on l until ctx is done or l is closed; it closes l
// when ctx is done. Each connection carries one request; at most MaxConns
// are served at once.
//
// Any other Accept error (EMFILE and ENFILE when the fd table is full,
// ECONNABORTED, ENOBUFS, …) is logged to log and retried after a backoff:
// the control socket is the operator's way in, and a supervisor that
// stopped answering on it after a burst of connections could no longer be
// upgraded or inspected, though the fds come free again moments later.
func Serve(ctx context.Context, l net.Listener, h Handler, log *zap.Logger) {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	slots := make(chan struct{}, MaxConns)
	var delay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			delay = min(max(2*delay, minBackoff), maxBackoff)
			log.Warn("control socket: accept failed, retrying", zap.Error(err), zap.Duration("retry_in", delay))
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return
			}
			continue
		}
		delay = 0
		select {
		case slots <- struct{}{}:
			go func() {
				defer func() { <-slots }()
				serveConn(ctx, c, h)
			}()
		default:
			// A fresh socket's send buffer takes the line without waiting;
			// the deadline bounds the write if it would not.
			c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			json.NewEncoder(c).Encode(Reply{Error: fmt.Sprintf("control socket: %d connections already being served; try again", MaxConns)})
			c.Close()
		}
	}
}

func serveConn(ctx context.Context, c net.Conn, h Handler) {
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(requestTimeout))
	br := bufio.NewReaderSize(c, MaxRequestSize)
	line, err := br.ReadSlice('\n')
	if err != nil && !(errors.Is(err, io.EOF) && len(line) > 0) {
		if errors.Is(err, bufio.ErrBufferFull) {
			err = fmt.Errorf("control request longer than %d bytes", MaxRequestSize)
		} else {
			err = fmt.Errorf("control request: %w", err)
		}
		c.SetWriteDeadline(time.Now().Add(writeTimeout))
		json.NewEncoder(c).Encode(Reply{Error: err.Error()})
		return
	}
	c.SetReadDeadline(time.Time{})
	enc := json.NewEncoder(c)
	send := func(v any) error {
		c.SetWriteDeadline(time.Now().Add(writeTimeout))
		return enc.Encode(v)
	}
	r, err := ParseRequest(bytes.TrimRight(line, "\r\n"))
	if err != nil {
		send(Reply{Error: err.Error()})
		return
	}
	if err := h(context.WithValue(ctx, connKey{}, c), r, send); err != nil {
		send(Reply{Error: err.Error()})
	}
}

// ErrNoServer is wrapped by Dial's (and Do's) error when nothing answers
// at the path: no socket file, or one left by an upgrader that was killed.
var ErrNoServer = errors.New("no upgrader answers there")

// Dial connects to the control socket at path.
func Dial(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("control socket %s: %w (%w)", path, ErrNoServer, err)
		}
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	return c, nil
}

// Do sends r to the control socket at path and calls recv with each raw
// reply line until the server closes the connection or ctx is done. A
// reply with "error" set is returned as an error.
func Do(ctx context.Context, path string, r Request, recv func(line []byte) error) error {
	c, err := Dial(ctx, path)
	if err != nil {
		return err
	}
	defer c.Close()
	return Exchange(ctx, c, path, r, recv)
}

// Exchange is Do on a connection already made (Dial); path names it in
// errors. It does not close c.
func Exchange(ctx context.Context, c net.Conn, path string, r Request, recv func(line []byte) error) error {
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	b, _ := json.Marshal(r)
	if _, err := c.Write(append(b, '\n')); err != nil {
		// A server that refuses the connection (MaxConns) answers and
		// closes before it reads: the write can meet the close (EPIPE)
		// while the answer, which says why, waits to be read.
		if sc := bufio.NewScanner(c); sc.Scan() {
			var rep Reply
			if json.Unmarshal(sc.Bytes(), &rep) == nil && rep.Error != "" {
				return errors.New(rep.Error)
			}
		}
		return fmt.Errorf("control socket %s: %w", path, err)
	}
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var rep Reply
		if json.Unmarshal(sc.Bytes(), &rep) == nil && rep.Error != "" {
			return errors.New(rep.Error)
		}
		if err := recv(sc.Bytes()); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("control socket %s: %w", path, err)
	}
	return nil
}
