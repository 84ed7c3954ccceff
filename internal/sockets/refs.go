package sockets

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"

	"golang.org/x/sys/unix"
)

// ErrNotListed is returned by ListenerRefs when the listener is not among
// the listening sockets of the caller's network namespace.
var ErrNotListed = errors.New("not among the listening sockets of /proc/net/tcp")

// Read sizes for ListenerRefs. The kernel's seq_file makes a record when
// a read finds none left over, copies what fits, and steps its iterator
// once past each record it makes. Past the last listening socket that
// step is a walk of the whole established hash, the cost ListenerRefs
// exists to avoid, so no record after fd's may be made: reads of
// refsReadFar make at most one record each (a tcp line is 150 bytes, a
// tcp6 one 170 or more, the headers 150 and 145) and leave part of a line
// over once they have shown its local address (up to byte 19 of a tcp
// line, 44 of a tcp6 one); once a line of fd's port has begun, reads of
// refsReadNear stop before its end, since the column after the reference
// count is a 16-digit pointer. The one step past fd's line is cheap when
// another listening socket follows it (supervise's freeMember sees to
// that for a reuseport group's old sockets).
const (
	refsReadFar  = 120
	refsReadNear = 16
)

// ListenerRefs returns the kernel's reference count of the TCP listening
// socket fd: struct sock's sk_refcnt, the column after the inode in
// /proc/net/tcp (/proc/net/tcp6 for an AF_INET6 socket; proc_net(5)) of
// the caller's network namespace.
//
// Each handshake under way on a listener (its SYN_RECV request socket, an
// IPv4 one on a dual-stack listener too) and each connection in its accept
// queue holds one reference until accept(2) (reqsk_alloc,
// include/net/request_sock.h; SYN cookies hold none, and leave no state to
// count). The count less the one the same socket had while no connection
// could reach it is how many it has between SYN and accept, which
// HandshakesPending finds only by a dump of the whole established hash
// (about a millisecond per family on a host with gigabytes of memory).
// Others may hold a reference for an instant (a sock_diag dump under way),
// so a count above the idle one errs on the side of waiting.
//
// It reads the listening section of the file, in which the kernel lists
// sockets by the hash of their port and address, and stops at fd's line:
// 37-44 µs here (BenchmarkListenerRefs, mostly the kernel's walk of the
// listening hash's 16,384 buckets), unless no listening socket comes after
// fd's, when the kernel's step past it walks the established hash as the
// dump does. The errors name fd; ErrNotListed when fd's inode is
// not among the listening sockets (not listening, or of another network
// namespace).
func ListenerRefs(fd int) (int, error) {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return 0, fmt.Errorf("listener fd %d: %w", fd, err)
	}
	path, port := "/proc/net/tcp", 0
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		port = a.Port
	case *unix.SockaddrInet6:
		path, port = "/proc/net/tcp6", a.Port
	default:
		return 0, fmt.Errorf("listener fd %d: not a TCP socket (%T)", fd, sa)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, fmt.Errorf("listener fd %d: %w", fd, err)
	}
	n, err := listenerRefs(path, st.Ino, port)
	if err != nil {
		return 0, fmt.Errorf("listener fd %d (inode %d): %s: %w", fd, st.Ino, path, err)
	}
	return n, nil
}

// listenerRefs finds the line of inode in path's listening section. A
// line is sl, local address, remote address, state, queues, timer,
// retransmits, uid, timeout, inode, reference count, then more.
func listenerRefs(path string, inode uint64, port int) (int, error) {
	file, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(file)
	const (
		colLocal, colState, colInode, colRefs = 1, 3, 9, 10
		listen                                = "0A" // TCP_LISTEN
	)
	ino := []byte(strconv.FormatUint(inode, 10))
	portHex := []byte(fmt.Sprintf(":%04X", port))
	buf := make([]byte, refsReadFar)
	var line []byte // the line the reads are in
	header := true
	for {
		size := refsReadFar
		if cols := bytes.Fields(line); len(cols) > colLocal && bytes.HasSuffix(cols[colLocal], portHex) {
			size = refsReadNear
		}
		k, err := unix.Read(file, buf[:size])
		if err != nil {
			return 0, err
		}
		if k == 0 {
			return 0, ErrNotListed
		}
		line = append(line, buf[:k]...)
		for {
			end, cur := bytes.IndexByte(line, '\n'), line
			if end >= 0 {
				cur = line[:end]
			}
			cols := bytes.Fields(cur)
			// The count is whole once the column after it has begun.
			if !header && (len(cols) > colRefs+1 || end >= 0 && len(cols) > colRefs) {
				if string(cols[colState]) != listen {
					return 0, ErrNotListed // the listening section is over
				}
				if bytes.Equal(cols[colInode], ino) {
					n, err := strconv.Atoi(string(cols[colRefs]))
					if err != nil {
						return 0, fmt.Errorf("reference count %q: %w", cols[colRefs], err)
					}
					return n, nil
				}
			}
			if end < 0 {
				break
			}
			line, header = line[end+1:], false
		}
	}
}
