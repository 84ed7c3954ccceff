package proctree

import (
	"encoding/binary"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// tcpEstablished is TCP_ESTABLISHED of include/net/tcp_states.h.
const tcpEstablished = 1

// EstablishedTCP returns the inodes of the established TCP sockets, IPv4
// and IPv6, of the caller's network namespace, as decimal strings (the
// keys of SocketInodes). It asks the kernel's sock_diag netlink interface
// (sock_diag(7): SOCK_DIAG_BY_FAMILY, a dump filtered to TCP_ESTABLISHED),
// so that its cost follows the established connections: a busy server's
// /proc/net/tcp is mostly TIME_WAIT rows, hundreds of thousands of them,
// and parsing it took seconds. The error is the netlink socket's.
func EstablishedTCP() (map[string]struct{}, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sock_diag netlink socket: %w", err)
	}
	defer unix.Close(fd)
	out := map[string]struct{}{}
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		if err := diagDump(fd, family, 1<<tcpEstablished, dumpBufLarge, func(m []byte) {
			out[fmt.Sprint(binary.NativeEndian.Uint32(m[msgInode:]))] = struct{}{}
		}); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// struct inet_diag_msg: family, state, timer, retrans, sockid (sport,
// dport, src[16], dst[16], if, cookie: 48 bytes), expires, rqueue, wqueue,
// uid, then the inode.
const (
	msgSport = 4
	msgSrc   = 8
	msgInode = 68
)

// Receive buffers of a dump. The kernel makes each message of a dump as
// large as the largest read the socket has seen, at least NLMSG_GOODSIZE
// (a page, less its overhead) and at most 32 KiB (netlink_dump,
// net/netlink/af_netlink.c), so a buffer of either size takes every one
// whole. A large one takes a dump of thousands of connections in few
// reads; a small one keeps the listening sockets' dump, two at every
// upgrade, from making 64 KiB of garbage each time (a collection every
// few upgrades, on their way).
const (
	dumpBufLarge = 64 << 10
	dumpBufSmall = 8 << 10
)

// diagDump sends one inet_diag_req_v2 dump request for family and the TCP
// states in the mask states, reads the answer into a buffer of bufSize
// (dumpBufLarge or dumpBufSmall), and calls each with every
// inet_diag_msg of it.
func diagDump(fd int, family uint8, states uint32, bufSize int, each func(msg []byte)) error {
	const (
		hdrLen = unix.SizeofNlMsghdr
		reqLen = 56 // struct inet_diag_req_v2
	)
	ne := binary.NativeEndian
	req := make([]byte, hdrLen+reqLen)
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	ne.PutUint32(req[8:], 1) // sequence number
	req[hdrLen], req[hdrLen+1] = family, unix.IPPROTO_TCP
	ne.PutUint32(req[hdrLen+4:], states)
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("sock_diag request: %w", err)
	}
	buf := make([]byte, max(bufSize, os.Getpagesize()))
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return fmt.Errorf("sock_diag answer: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return fmt.Errorf("sock_diag answer: %w", err)
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if errno := int32(ne.Uint32(m.Data)); errno != 0 {
						return fmt.Errorf("sock_diag answer: %w", unix.Errno(-errno))
					}
				}
				return nil
			case unix.SOCK_DIAG_BY_FAMILY:
				if len(m.Data) >= msgInode+4 {
					each(m.Data)
				}
			}
		}
	}
}

// SameNetNamespace tells whether process pid (under root, normally /proc)
// is in the caller's network namespace, so that EstablishedTCP sees its
// sockets.
func SameNetNamespace(root string, pid int) bool {
	self, err1 := os.Readlink(root + "/self/ns/net")
	other, err2 := os.Readlink(fmt.Sprintf("%s/%d/ns/net", root, pid))
	return err1 == nil && err2 == nil && self == other
}

// tcpListen is TCP_LISTEN of include/net/tcp_states.h.
const tcpListen = 10

// ListeningTCP returns the inodes of the listening TCP sockets of the
// caller's network namespace bound to the address sa names (an
// *unix.SockaddrInet4 or *unix.SockaddrInet6): the members of its
// reuseport group, and any socket of another group on the same address.
// It asks sock_diag, filtered to TCP_LISTEN, as EstablishedTCP does.
func ListeningTCP(sa unix.Sockaddr) (map[uint64]struct{}, error) {
	var family uint8
	var port int
	var addr []byte
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		family, port, addr = unix.AF_INET, a.Port, a.Addr[:]
	case *unix.SockaddrInet6:
		family, port, addr = unix.AF_INET6, a.Port, a.Addr[:]
	default:
		return nil, fmt.Errorf("listening TCP sockets on %T: not an IP address", sa)
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sock_diag netlink socket: %w", err)
	}
	defer unix.Close(fd)
	out := map[uint64]struct{}{}
	err = diagDump(fd, family, 1<<tcpListen, dumpBufSmall, func(m []byte) {
		if int(binary.BigEndian.Uint16(m[msgSport:])) == port && string(m[msgSrc:msgSrc+len(addr)]) == string(addr) {
			out[uint64(binary.NativeEndian.Uint32(m[msgInode:]))] = struct{}{}
		}
	})
	return out, err
}
