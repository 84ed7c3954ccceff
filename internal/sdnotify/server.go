package sdnotify

import (
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/sockets"
)

// maxFDsPerMessage bounds the SCM_RIGHTS fds read from one datagram; it is the
// kernel's SCM_MAX_FD.
const maxFDsPerMessage = 253

// Server is the receiving end of $NOTIFY_SOCKET: a SOCK_DGRAM Unix socket
// with SO_PASSCRED set, so that every datagram carries its sender's
// credentials (unix(7), SCM_CREDENTIALS).
type Server struct {
	conn   *net.UnixConn
	path   string
	maxFDs int
	// buf and oob are Recv's, kept: a few datagrams come at every
	// upgrade, and new buffers for each (5 KiB) were garbage on its way.
	buf, oob []byte
}

// Datagram is one message received by a Server.
type Datagram struct {
	// Pid, UID and GID of the sender, as the kernel vouches for them; Pid is
	// -1 when no credentials came with the datagram.
	Pid int
	UID uint32
	GID uint32
	// Message is the parsed payload; nil when Err is set.
	Message Message
	// Err is the parse error of a malformed payload.
	Err error
	// Files are the fds that came with the datagram (FDSTORE=1). The caller
	// owns them and must close those it does not keep.
	Files []*os.File
	// FDsTruncated: more fds came than the server takes; the kernel closed
	// the rest (MSG_CTRUNC). The payload is parsed all the same.
	FDsTruncated bool
}

// Listen creates a notify socket bound to path, a filesystem path that must
// not exist yet. Access is governed by the directory that holds it.
//
// maxFDs bounds the SCM_RIGHTS fds taken from one datagram (at most 253,
// the kernel's SCM_MAX_FD; 0 takes none): the kernel closes the excess
// itself (MSG_CTRUNC, unix(7)), so a sender cannot fill this process's fd
// table with fds that would only be closed again.
func Listen(path string, maxFDs int) (*Server, error) {
	maxFDs = min(max(maxFDs, 0), maxFDsPerMessage)
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("notify socket %s: %w", path, err)
	}
	rc, err := conn.SyscallConn()
	if err == nil {
		cerr := rc.Control(func(fd uintptr) {
			err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
			// Generous receive buffer: many workers send READY=1 at once.
			_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 1<<20)
		})
		if err == nil {
			err = cerr
		}
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("notify socket %s: SO_PASSCRED: %w", path, err)
	}
	return &Server{conn: conn, path: path, maxFDs: maxFDs}, nil
}

// Path is the address to put in NOTIFY_SOCKET.
func (s *Server) Path() string { return s.path }

// Recv blocks until a datagram arrives. A malformed payload is returned as a
// Datagram with Err set, not as an error, so that the caller can name the
// sender. The error is non-nil only when the socket fails or was closed
// (then it wraps net.ErrClosed). It reads into buffers of s, so it must
// not be called from two goroutines at once; nothing it returns refers to
// them.
func (s *Server) Recv() (Datagram, error) {
	if s.buf == nil {
		oobn := unix.CmsgSpace(unix.SizeofUcred)
		if s.maxFDs > 0 {
			oobn += unix.CmsgSpace(4 * s.maxFDs)
		}
		s.buf, s.oob = make([]byte, MaxMessageSize+1), make([]byte, oobn)
	}
	buf, oob := s.buf, s.oob
	n, oobn, flags, _, err := s.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return Datagram{}, fmt.Errorf("notify socket %s: %w", s.path, err)
	}
	d := Datagram{Pid: -1}
	if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
		for _, c := range cmsgs {
			if cred, err := unix.ParseUnixCredentials(&c); err == nil {
				d.Pid, d.UID, d.GID = int(cred.Pid), cred.Uid, cred.Gid
			} else if fds, err := unix.ParseUnixRights(&c); err == nil {
				for _, fd := range fds {
					unix.CloseOnExec(fd)
					d.Files = append(d.Files, os.NewFile(uintptr(fd), "fdstore"))
				}
			}
		}
	}
	d.FDsTruncated = flags&unix.MSG_CTRUNC != 0
	if flags&unix.MSG_TRUNC != 0 || n > MaxMessageSize {
		d.Err = fmt.Errorf("notify message larger than %d bytes", MaxMessageSize)
	} else {
		d.Message, d.Err = Parse(buf[:n])
	}
	return d, nil
}

// Close closes the socket, which makes a blocked Recv return, and removes
// its file.
func (s *Server) Close() error {
	err := s.conn.Close()
	os.Remove(s.path) // unixgram sockets, unlike listeners, are not unlinked by net
	return err
}

// DupFD returns a close-on-exec duplicate of the socket's fd, taken so that
// the socket stays non-blocking: to carry it across an exec.
func (s *Server) DupFD() (int, error) {
	return sockets.DupFD(s.conn)
}

// FromFD takes over fd, a notify socket bound to path that an earlier image
// of this process created (Listen), and serves it as Listen's Server does.
func FromFD(fd int, path string, maxFDs int) (*Server, error) {
	f := os.NewFile(uintptr(fd), "notify")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("notify socket fd %d: %w", fd, err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("notify socket fd %d: not a Unix socket", fd)
	}
	return &Server{conn: uc, path: path, maxFDs: min(max(maxFDs, 0), maxFDsPerMessage)}, nil
}
