// Package nodeipc is upgrader's end of Node.js's IPC channel, the one
// behind child_process.fork() and process.send(): newline-delimited JSON on
// an AF_UNIX/SOCK_STREAM socket (unix(7)), with a socket's fd attached by
// SCM_RIGHTS to the line that names it. It follows Node's own "json"
// serialization and handle passing (lib/internal/child_process.js and
// lib/internal/child_process/serialization.js, Node.js 18 to 22);
// docs/reference/node-ipc.md is the specification for workers.
//
// Conn is the framing and Node's internal handshake (NODE_HANDLE and its
// ACK, NACK); Channel maps upgrader's messages on it to the handoff
// protocol and to sd_notify(3) assignments.
package nodeipc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/workerenv"
)

// Environment of a Node.js process with an IPC channel, as
// child_process.fork() sets it.
const (
	EnvChannelFD     = workerenv.NodeChannelFD
	EnvSerialization = workerenv.NodeSerialization
	// SerializationJSON is the one serialization spoken here; Node's
	// "advanced" one (the V8 serializer) is not.
	SerializationJSON = "json"
)

// Node's internal commands: a message whose cmd starts with "NODE_" is
// Node's own, any other the application's.
const (
	CmdHandle            = "NODE_HANDLE"
	CmdHandleAck         = "NODE_HANDLE_ACK"
	CmdHandleNack        = "NODE_HANDLE_NACK"
	CmdSocketNotifyClose = "NODE_SOCKET_NOTIFY_CLOSE"
	CmdSocketAllClosed   = "NODE_SOCKET_ALL_CLOSED"
	CmdSocketGetCount    = "NODE_SOCKET_GET_COUNT"
	CmdSocketCount       = "NODE_SOCKET_COUNT"
	internalPrefix       = "NODE_"
	// TypeSocket is the NODE_HANDLE type of a net.Socket, the only one
	// taken here.
	TypeSocket = "net.Socket"
)

const (
	// MaxLine bounds one message, in bytes; a longer line is dropped up to
	// its newline and the channel goes on.
	MaxLine = 1 << 20
	// MaxRetransmissions is how many times a handle is sent again after a
	// NODE_HANDLE_NACK, as Node's MAX_HANDLE_RETRANSMISSIONS.
	MaxRetransmissions = 3
	// maxLooseFDs bounds the fds received and not yet claimed by a
	// NODE_HANDLE line; Node sends one handle at a time.
	maxLooseFDs = 4
	readChunk   = 64 << 10
)

// ErrMalformed wraps every error about what the peer sent that the channel
// survives.
var ErrMalformed = errors.New("malformed Node.js IPC message")

// ErrNotTaken is returned by SendHandle when the peer answered NACK to
// every transmission: it does not hold the handle.
var ErrNotTaken = errors.New("the peer did not receive the handle (NODE_HANDLE_NACK)")

// Pair returns the two ends of a new channel, close-on-exec: one for the
// supervisor, one to pass to a worker at NODE_CHANNEL_FD.
func Pair() (*os.File, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("node IPC socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "node-ipc"), os.NewFile(uintptr(fds[1]), "node-ipc"), nil
}

// Msg is one application message: the JSON value and the fd of the socket
// that came with it (-1: none), which the receiver owns.
type Msg struct {
	JSON json.RawMessage
	FD   int
	// Handle is true for a message that came as NODE_HANDLE: FD is -1 if
	// its fd did not arrive (the peer was sent a NACK).
	Handle bool
}

// Conn is one end of a Node.js IPC channel. Recv is for one goroutine;
// Send and SendHandle are safe for concurrent use.
type Conn struct {
	c *net.UnixConn

	// Read side, owned by Recv's goroutine.
	buf   []byte // bytes read, not yet a whole line
	rbuf  []byte // what one read fills
	oob   []byte
	skip  bool  // dropping an over-long line up to its newline
	loose []int // fds received, not yet claimed by a NODE_HANDLE line

	wmu sync.Mutex // one write at a time
	hmu sync.Mutex // one handle in flight at a time
	// acks carries NODE_HANDLE_ACK (true) and NACK (false) from Recv to
	// the SendHandle waiting for one.
	acks    chan bool
	timeout time.Duration
}

// NewConn wraps f (which it takes over and closes) as a Conn. f must be an
// AF_UNIX/SOCK_STREAM socket; the error says what it is otherwise.
func NewConn(f *os.File) (*Conn, error) {
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("node IPC fd %d: %w", f.Fd(), err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok || uc.LocalAddr().Network() != "unix" {
		c.Close()
		return nil, fmt.Errorf("node IPC fd: not an AF_UNIX/SOCK_STREAM socket (%s)", c.LocalAddr().Network())
	}
	return &Conn{c: uc, acks: make(chan bool, 1), timeout: 2 * time.Second}, nil
}

// SetSendTimeout bounds each later write to a peer that does not read, and
// SendHandle's wait for the peer's NODE_HANDLE_ACK (default 2 s).
func (c *Conn) SetSendTimeout(d time.Duration) { c.timeout = d }

// Close closes the channel; a Recv blocked in it returns an error, and
// the fds it held are closed.
func (c *Conn) Close() error { return c.c.Close() }

// DupFD returns a close-on-exec duplicate of the channel's fd.
func (c *Conn) DupFD() (int, error) {
	rc, err := c.c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	return fd, derr
}

// Send writes v, marshalled as JSON, as one message.
func (c *Conn) Send(v any) error {
	line, err := marshalLine(v)
	if err != nil {
		return err
	}
	return c.write(line, -1)
}

// SendHandle sends msg with the socket fd as Node does for
// process.send(msg, socket): {"cmd":"NODE_HANDLE","type":"net.Socket",
// "msg":msg} with fd attached, and waits for the peer's answer, sending
// again on a NACK up to MaxRetransmissions times. On nil the peer holds its
// own reference to the socket; fd stays open in the caller either way.
// The answer comes in through Recv, which another goroutine must be
// running. Errors: ErrNotTaken after the last NACK; a timeout when the peer did not
// answer (it may still take the handle); a write error.
func (c *Conn) SendHandle(msg any, fd int) error {
	line, err := marshalLine(struct {
		Cmd  string `json:"cmd"`
		Type string `json:"type"`
		Msg  any    `json:"msg"`
	}{CmdHandle, TypeSocket, msg})
	if err != nil {
		return err
	}
	c.hmu.Lock()
	defer c.hmu.Unlock()
	select { // a stale answer to a handle that timed out
	case <-c.acks:
	default:
	}
	for try := 0; ; try++ {
		if err := c.write(line, fd); err != nil {
			return err
		}
		select {
		case ok := <-c.acks:
			if ok {
				return nil
			}
			if try == MaxRetransmissions {
				return ErrNotTaken
			}
		case <-time.After(c.timeout):
			return fmt.Errorf("node IPC: no NODE_HANDLE_ACK within %s", c.timeout)
		}
	}
}

// write sends line, with fd (if ≥ 0) attached to its first bytes.
func (c *Conn) write(line []byte, fd int) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.timeout > 0 {
		c.c.SetWriteDeadline(time.Now().Add(c.timeout))
	}
	if fd >= 0 {
		n, _, err := c.c.WriteMsgUnix(line, unix.UnixRights(fd), nil)
		if err != nil {
			return fmt.Errorf("node IPC send: %w", err)
		}
		line = line[n:] // a stream socket may take part of it
	}
	for len(line) > 0 {
		n, err := c.c.Write(line)
		if err != nil {
			return fmt.Errorf("node IPC send: %w", err)
		}
		line = line[n:]
	}
	return nil
}

func marshalLine(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("node IPC: %w", err)
	}
	if len(b)+1 > MaxLine {
		return nil, fmt.Errorf("node IPC: message of %d bytes over %d", len(b)+1, MaxLine)
	}
	return append(b, '\n'), nil
}

// Recv returns the next application message. Node's internal messages are
// answered here: NODE_HANDLE with NODE_HANDLE_ACK (its message returned
// with the fd) or, when no fd came, NODE_HANDLE_NACK (returned with FD -1);
// NODE_HANDLE_ACK and NACK go to SendHandle; the socket-list questions of
// a net.Server get their "nothing left here" answer. A malformed line is
// returned as an error wrapping ErrMalformed, after which Recv may be
// called again; any other error ends the channel.
func (c *Conn) Recv() (Msg, error) {
	for {
		if line, ok := c.nextLine(); ok {
			if len(line) > MaxLine {
				return Msg{FD: -1}, fmt.Errorf("%w: a line of %d bytes, over %d", ErrMalformed, len(line), MaxLine)
			}
			m, isApp, err := c.handleLine(line)
			if err != nil {
				return Msg{FD: -1}, err
			}
			if isApp {
				return m, nil
			}
			continue
		}
		if len(c.buf) > MaxLine {
			n := len(c.buf)
			c.buf, c.skip = nil, true
			return Msg{FD: -1}, fmt.Errorf("%w: a line of more than %d bytes (%d so far), dropped up to its end", ErrMalformed, MaxLine, n)
		}
		if err := c.fill(); err != nil {
			c.closeLoose()
			return Msg{FD: -1}, err
		}
	}
}

// nextLine cuts the next whole line from buf.
func (c *Conn) nextLine() ([]byte, bool) {
	for {
		i := bytes.IndexByte(c.buf, '\n')
		if i < 0 {
			return nil, false
		}
		line := c.buf[:i:i]
		c.buf = c.buf[i+1:]
		if c.skip {
			c.skip = false
			continue
		}
		return line, true
	}
}

// fill reads more bytes and fds.
func (c *Conn) fill() error {
	if c.rbuf == nil {
		c.rbuf, c.oob = make([]byte, readChunk), make([]byte, unix.CmsgSpace(maxLooseFDs*4))
	}
	if len(c.buf) == 0 {
		c.buf = nil // let a drained buffer go; messages returned keep theirs
	}
	n, oobn, _, _, err := c.c.ReadMsgUnix(c.rbuf, c.oob)
	if oobn > 0 {
		c.takeFDs(c.oob[:oobn])
	}
	if n > 0 {
		c.buf = append(c.buf, c.rbuf[:n]...)
	}
	if err != nil {
		return err
	}
	if n == 0 {
		return errors.New("node IPC: channel closed by the worker")
	}
	return nil
}

// takeFDs keeps the fds in oob; beyond maxLooseFDs unclaimed, the oldest
// are closed, so that a peer sending fds with no NODE_HANDLE cannot make
// upgrader hold them.
func (c *Conn) takeFDs(oob []byte) {
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	for _, cm := range cmsgs {
		fds, err := unix.ParseUnixRights(&cm)
		if err != nil {
			continue
		}
		c.loose = append(c.loose, fds...)
	}
	for len(c.loose) > maxLooseFDs {
		unix.Close(c.loose[0])
		c.loose = c.loose[1:]
	}
}

func (c *Conn) closeLoose() {
	for _, fd := range c.loose {
		unix.Close(fd)
	}
	c.loose = nil
}

// internal is the part of a message Node's own commands use.
type internal struct {
	Cmd  string          `json:"cmd"`
	Type string          `json:"type"`
	Msg  json.RawMessage `json:"msg"`
	Key  json.RawMessage `json:"key"`
}

// handleLine handles one line: an application message (isApp), or one of
// Node's, answered here.
func (c *Conn) handleLine(line []byte) (Msg, bool, error) {
	if len(bytes.TrimSpace(line)) == 0 {
		return Msg{}, false, nil
	}
	var in internal
	if !json.Valid(line) {
		return Msg{}, false, fmt.Errorf("%w: line %.80q is not JSON", ErrMalformed, line)
	}
	if line[0] != '{' || json.Unmarshal(line, &in) != nil || len(in.Cmd) <= len(internalPrefix) ||
		in.Cmd[:len(internalPrefix)] != internalPrefix {
		return Msg{JSON: json.RawMessage(line), FD: -1}, true, nil
	}
	switch in.Cmd {
	case CmdHandle:
		return c.onHandle(in)
	case CmdHandleAck, CmdHandleNack:
		select {
		case c.acks <- in.Cmd == CmdHandleAck:
		default: // nobody waits: an answer we did not ask for
		}
	case CmdSocketNotifyClose:
		c.answerSocketList(CmdSocketAllClosed, in.Key, false)
	case CmdSocketGetCount:
		c.answerSocketList(CmdSocketCount, in.Key, true)
	}
	return Msg{}, false, nil
}

// onHandle claims the fd of a NODE_HANDLE and answers it.
func (c *Conn) onHandle(in internal) (Msg, bool, error) {
	fd := -1
	if len(c.loose) > 0 {
		fd, c.loose = c.loose[0], c.loose[1:]
	}
	if fd < 0 {
		c.Send(map[string]string{"cmd": CmdHandleNack})
		return Msg{JSON: in.Msg, FD: -1, Handle: true}, true, nil
	}
	// Node's sender queues everything after a handle until this answer:
	// it goes at once, whatever becomes of the message.
	c.Send(map[string]string{"cmd": CmdHandleAck})
	if in.Type != TypeSocket {
		unix.Close(fd)
		return Msg{}, false, fmt.Errorf("%w: a handle of type %.40q, not %s", ErrMalformed, in.Type, TypeSocket)
	}
	return Msg{JSON: in.Msg, FD: fd, Handle: true}, true, nil
}

// answerSocketList answers a net.Server's question about the sockets it
// sent: none is left here (each belongs to its taker).
func (c *Conn) answerSocketList(cmd string, key json.RawMessage, count bool) {
	m := map[string]any{"cmd": cmd, "key": key}
	if len(key) == 0 {
		m["key"] = nil
	}
	if count {
		m["count"] = 0
	}
	c.Send(m)
}
