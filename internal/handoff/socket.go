package handoff

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/sockets"
)

// Socket is one end of a handoff channel: a SOCK_SEQPACKET Unix socket, so
// that every message, with its fds, arrives whole and in order.
type Socket struct {
	c       *net.UnixConn
	wmu     sync.Mutex
	timeout time.Duration
	// roob is Recv's control buffer, reused from one message to the next.
	roob []byte
}

// SetSendTimeout bounds every later Send: a peer that does not read makes
// Send fail after d instead of blocking (0: no bound).
func (s *Socket) SetSendTimeout(d time.Duration) { s.timeout = d }

// Pair returns the two ends of a new channel, close-on-exec: one for the
// supervisor, one to pass to a worker.
func Pair() (*os.File, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("handoff socketpair: %w", err)
	}
	for _, fd := range fds {
		// Room for a full message with all its fds in flight.
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4*MaxMessage)
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4*MaxMessage)
	}
	return os.NewFile(uintptr(fds[0]), "handoff"), os.NewFile(uintptr(fds[1]), "handoff"), nil
}

// NewSocket wraps f (which it takes over and closes) as a Socket. f must be
// a SOCK_SEQPACKET Unix socket; the error says what it is otherwise.
func NewSocket(f *os.File) (*Socket, error) {
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("handoff fd %d: %w", f.Fd(), err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok || uc.LocalAddr().Network() != "unixpacket" {
		c.Close()
		return nil, fmt.Errorf("handoff fd: not a SOCK_SEQPACKET Unix socket (%s)", c.LocalAddr().Network())
	}
	return &Socket{c: uc}, nil
}

// Send encodes m and sends it with fds (SCM_RIGHTS). The fds stay open in
// the caller. Safe for concurrent use.
func (s *Socket) Send(m Message, fds []int) error {
	b, err := Encode(m)
	if err != nil {
		return err
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.timeout > 0 {
		s.c.SetWriteDeadline(time.Now().Add(s.timeout))
	}
	if _, _, err := s.c.WriteMsgUnix(b, oob, nil); err != nil {
		return fmt.Errorf("handoff send %s: %w", m.Type, err)
	}
	return nil
}

// StampArrivals asks the kernel to stamp each message as it is queued at
// this end (SO_TIMESTAMPNS, socket(7); CLOCK_REALTIME): from then on Recv
// sets Message.Arrived, so that a receiver can tell how long a message
// waited for it. A message queued before the call is stamped as it is
// read (it looks fresh). The error names the socket option.
func (s *Socket) StampArrivals() error {
	rc, err := s.c.SyscallConn()
	if err != nil {
		return fmt.Errorf("handoff SO_TIMESTAMPNS: %w", err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1)
	}); err != nil {
		return fmt.Errorf("handoff SO_TIMESTAMPNS: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("handoff SO_TIMESTAMPNS: %w", serr)
	}
	return nil
}

// ErrClosed is returned by Recv once the peer has closed the channel.
var ErrClosed = errors.New("handoff channel closed")

// Recv receives one message with the fds that came with it, raw and
// close-on-exec: the caller owns them and must close each (CloseFDs). Raw,
// because wrapping each in an *os.File would register it with the poller
// for nothing: it is forwarded or turned into a net.Conn. For a malformed
// message the fds come with an error wrapping ErrMalformed, and the channel
// stays usable. Other errors end the channel; ErrClosed when the peer has
// gone. Not safe for concurrent use.
func (s *Socket) Recv() (Message, []int, error) {
	// The control buffer is the socket's own, reused (Recv is not for
	// concurrent use); the message's, which it keeps slices of, is its
	// own size (readMsg).
	if s.roob == nil {
		// Room for a timestamp too (StampArrivals): without it the kernel
		// would truncate the control data, and the message be malformed.
		s.roob = make([]byte, unix.CmsgSpace(4*MaxFDs)+unix.CmsgSpace(timespecSize))
	}
	oob := s.roob
	buf, oobn, flags, err := s.readMsg(oob)
	n := len(buf)
	if errors.Is(err, io.EOF) {
		return Message{}, nil, ErrClosed
	}
	if err != nil {
		return Message{}, nil, fmt.Errorf("handoff receive: %w", err)
	}
	var files []int
	var arrived time.Time
	if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
		for _, c := range cmsgs {
			if c.Header.Level == unix.SOL_SOCKET && c.Header.Type == unix.SCM_TIMESTAMPNS {
				arrived = parseTimespec(c.Data)
			} else if fds, err := unix.ParseUnixRights(&c); err == nil {
				files = append(files, fds...)
			}
		}
	}
	if n == 0 && oobn == 0 {
		return Message{}, nil, ErrClosed
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		return Message{}, files, fmt.Errorf("%w: truncated (over %d bytes or %d fds)", ErrMalformed, MaxMessage, MaxFDs)
	}
	m, err := Parse(buf, len(files))
	m.Arrived = arrived
	return m, files, err
}

// timespecSize is the size of SCM_TIMESTAMPNS's struct timespec on 64-bit
// Linux (two 64-bit fields), the most Recv makes room for.
const timespecSize = 16

// parseTimespec reads an SCM_TIMESTAMPNS payload: two 64-bit fields, or
// two 32-bit ones (32-bit Linux, whose SO_TIMESTAMPNS is the old,
// 32-bit-time option); the zero time for any other size.
func parseTimespec(b []byte) time.Time {
	switch len(b) {
	case 16:
		return time.Unix(int64(binary.NativeEndian.Uint64(b[0:8])), int64(binary.NativeEndian.Uint64(b[8:16])))
	case 8:
		return time.Unix(int64(int32(binary.NativeEndian.Uint32(b[0:4]))), int64(int32(binary.NativeEndian.Uint32(b[4:8]))))
	}
	return time.Time{}
}

// Close closes the channel; a blocked Recv returns.
func (s *Socket) Close() error { return s.c.Close() }

// SetReadDeadline makes a Recv that waits at t, or that is called after it
// while t stands, return an error wrapping os.ErrDeadlineExceeded; the
// zero time clears it. Safe to call while another goroutine waits in Recv,
// which sees the change.
func (s *Socket) SetReadDeadline(t time.Time) error { return s.c.SetReadDeadline(t) }

// Queued reports whether a Recv would return at once: a message waits at
// this end, or the peer has closed its end, which a Recv returns as
// ErrClosed (poll(2) with no wait: POLLIN, which unix(7) sockets also set
// on a hang-up). A caller that times a peer out only once nothing is
// queued thus reads a hang-up first, however late it looks.
func (s *Socket) Queued() (bool, error) {
	rc, err := s.c.SyscallConn()
	if err != nil {
		return false, fmt.Errorf("handoff poll: %w", err)
	}
	var n int
	var perr error
	pfd := []unix.PollFd{{Events: unix.POLLIN}}
	if err := rc.Control(func(fd uintptr) {
		pfd[0].Fd = int32(fd)
		for {
			if n, perr = unix.Poll(pfd, 0); perr != unix.EINTR {
				return
			}
		}
	}); err != nil {
		return false, fmt.Errorf("handoff poll: %w", err)
	}
	if perr != nil {
		return false, fmt.Errorf("handoff poll: %w", perr)
	}
	return n > 0 && pfd[0].Revents&(unix.POLLIN|unix.POLLHUP|unix.POLLERR) != 0, nil
}

// readMsg is recvmsg(2) with MSG_CMSG_CLOEXEC (a received fd never leaks
// into a child), through the poller, into a buffer of the message's own
// size: a first recvmsg with MSG_PEEK|MSG_TRUNC and no room for control
// data returns the size and leaves the message queued with its fds
// (unix(7), socket(7)). A buffer of MaxMessage kept by every channel was
// 192 KiB of the supervisor's memory for each worker alive; one made for
// each message costs the copy the parse needed anyway. A message over
// MaxMessage is read into MaxMessage+1 bytes, and so is truncated.
func (s *Socket) readMsg(oob []byte) (buf []byte, oobn, flags int, err error) {
	rc, err := s.c.SyscallConn()
	if err != nil {
		return nil, 0, 0, err
	}
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		var size, n int
		size, _, _, _, rerr = unix.Recvmsg(int(fd), nil, nil, unix.MSG_PEEK|unix.MSG_TRUNC)
		if rerr != nil {
			return rerr != unix.EAGAIN
		}
		buf = make([]byte, min(max(size, 1), MaxMessage+1))
		n, oobn, flags, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_CMSG_CLOEXEC)
		buf = buf[:max(n, 0)]
		return rerr != unix.EAGAIN
	})
	if err == nil {
		err = rerr
	}
	if err == nil && len(buf) == 0 && oobn == 0 {
		err = io.EOF
	}
	return buf, oobn, flags, err
}

// ReserveFDs grows this process's fd table to hold fds up to n-1 (capped
// below RLIMIT_NOFILE), as ReserveFDTable does with the socket's fd.
func (s *Socket) ReserveFDs(n int) error {
	rc, err := s.c.SyscallConn()
	if err != nil {
		return err
	}
	var rerr error
	if err := rc.Control(func(fd uintptr) { rerr = ReserveFDTable(int(fd), n) }); err != nil {
		return err
	}
	return rerr
}

// ReserveFDTable grows this process's fd table to hold fds up to n-1
// (capped below RLIMIT_NOFILE), by duplicating fd, any open descriptor,
// at n-1 (fcntl(2) F_DUPFD_CLOEXEC) and closing the copy. The table never
// shrinks; it costs 8 bytes and two bits a slot.
//
// Why: recvmsg(2) installs each received fd, growing the table (doubling
// it) whenever one does not fit, and in a multi-threaded process every
// growth waits for an RCU grace period (synchronize_rcu in the kernel's
// expand_fdtable), milliseconds each, with the receiving thread stalled.
// Taking 10,000 connections from 64 slots means eight of them in a row
// (measured: over half of a 10,000-connection handoff). Growing ahead, on
// a goroutine of its own, leaves the receiver's slots free meanwhile.
func ReserveFDTable(fd, n int) error {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err == nil && uint64(n) > rl.Cur {
		n = int(rl.Cur)
	}
	if n <= 1 {
		return nil
	}
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, n-1)
	if err != nil {
		return fmt.Errorf("reserve %d fds: %w", n, err)
	}
	return unix.Close(nfd)
}

// CloseFDs closes raw fds from Recv. recvmsg(2) puts a batch's fds in the
// lowest free slots of the table, so they mostly come as runs of
// consecutive numbers: each run of two or more is closed by one
// close_range(2) (Linux 5.9), about a third of the time of a close(2)
// each (95 against 320 ns an fd on 2 cores, BenchmarkCloseFDs); a kernel
// without it gets a close(2) each.
func CloseFDs(fds []int) {
	for i := 0; i < len(fds); {
		j := i + 1
		for j < len(fds) && fds[j] == fds[j-1]+1 {
			j++
		}
		if j-i < 2 || fds[i] < 0 || unix.CloseRange(uint(fds[i]), uint(fds[j-1]), 0) != nil {
			for _, fd := range fds[i:j] {
				unix.Close(fd)
			}
		}
		i = j
	}
}

// DupFD returns a close-on-exec duplicate of the socket's fd, taken through
// SyscallConn so that the socket stays non-blocking: to carry it across an
// exec of the supervisor.
func (s *Socket) DupFD() (int, error) {
	return sockets.DupFD(s.c)
}
