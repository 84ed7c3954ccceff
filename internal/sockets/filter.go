package sockets

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// synFilter is a classic BPF socket filter that drops a TCP segment with
// SYN set and ACK clear (a new handshake) and keeps every other one. A
// socket filter sees the skb from the transport header on, so byte 13 is
// TCP's flags byte, for IPv4 and IPv6 alike. It must not drop everything:
// the final ACK of a handshake in SYN_RECV is checked against the
// listener's filter (tcp_v4_rcv, TCP_NEW_SYN_RECV), and a child socket
// created after the attach copies the listener's filter (sk_clone), so a
// drop-all filter would strand the handshakes under way and blind the
// connections they create.
var synFilter = []unix.SockFilter{
	{Code: unix.BPF_LD | unix.BPF_B | unix.BPF_ABS, K: 13},    // A = tcp flags
	{Code: unix.BPF_ALU | unix.BPF_AND | unix.BPF_K, K: 0x12}, // A &= SYN|ACK
	{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: 0x02, Jt: 0, Jf: 1},
	{Code: unix.BPF_RET | unix.BPF_K, K: 0},          // a bare SYN: drop
	{Code: unix.BPF_RET | unix.BPF_K, K: 0xffffffff}, // anything else: keep all of it
}

// RefuseNewConnections attaches a socket filter to the listening TCP
// socket fd that makes the kernel drop new SYNs, while the connections
// already queued stay accept()-able, the handshakes under way complete and
// every connection's data flows. A client whose SYN was dropped
// retransmits it (after about 1 s, then 3 s, …) and is refused once the
// socket is closed, or served if the socket is adopted again and
// AcceptNewConnections runs. It needs no privilege (SO_ATTACH_FILTER,
// Linux 2.2). The error names fd.
func RefuseNewConnections(fd int) error {
	prog := unix.SockFprog{Len: uint16(len(synFilter)), Filter: unsafe.SliceData(synFilter)}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &prog); err != nil {
		return fmt.Errorf("listener fd %d: SO_ATTACH_FILTER: %w", fd, err)
	}
	return nil
}

// AcceptNewConnections removes a socket filter from fd, as a socket that a
// stop filtered (RefuseNewConnections) needs when it is adopted again: from
// systemd's fd store after a stop or a crash, or across a self-upgrade. It
// reports whether there was a filter to remove. The error names fd.
func AcceptNewConnections(fd int) (bool, error) {
	err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DETACH_FILTER, 0)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.ENOENT): // no filter attached
		return false, nil
	}
	return false, fmt.Errorf("listener fd %d: SO_DETACH_FILTER: %w", fd, err)
}

// QueueLen returns how many connections wait in the accept queue of the
// listening socket fd: established by the kernel, not yet accept()ed. For
// TCP it is tcpi_unacked of TCP_INFO, which Linux sets to the accept
// backlog on a listening socket (since 2.6.x); for a Unix stream socket,
// the listener's receive-queue length from sock_diag (UNIX_DIAG_RQLEN,
// Linux 3.3). Connections still in SYN_RECV are not counted. The error
// names fd.
func QueueLen(fd int) (int, error) {
	dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return 0, fmt.Errorf("listener fd %d: SO_DOMAIN: %w", fd, err)
	}
	if dom == unix.AF_UNIX {
		return unixQueueLen(fd)
	}
	ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, fmt.Errorf("listener fd %d: TCP_INFO: %w", fd, err)
	}
	if ti.State != unix.BPF_TCP_LISTEN {
		return 0, fmt.Errorf("listener fd %d: not a listening TCP socket (state %d)", fd, ti.State)
	}
	return int(ti.Unacked), nil
}

// unixQueueLen asks sock_diag for the Unix listener fd's queue, by inode.
func unixQueueLen(fd int) (int, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, fmt.Errorf("listener fd %d: %w", fd, err)
	}
	nl, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return 0, fmt.Errorf("listener fd %d: sock_diag: %w", fd, err)
	}
	defer unix.Close(nl)
	req := unixDiagRequest{
		hdr: unix.NlMsghdr{Type: unix.SOCK_DIAG_BY_FAMILY, Flags: unix.NLM_F_REQUEST, Seq: 1},
		req: unixDiagReq{Family: unix.AF_UNIX, States: 1 << unix.BPF_TCP_LISTEN, Ino: uint32(st.Ino),
			Show: udiagShowRQLen, Cookie: [2]uint32{^uint32(0), ^uint32(0)}},
	}
	req.hdr.Len = uint32(unsafe.Sizeof(req))
	buf := (*[unsafe.Sizeof(req)]byte)(unsafe.Pointer(&req))[:]
	if err := unix.Sendto(nl, buf, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, fmt.Errorf("listener fd %d: sock_diag: %w", fd, err)
	}
	resp := make([]byte, os.Getpagesize())
	n, _, err := unix.Recvfrom(nl, resp, 0)
	if err != nil {
		return 0, fmt.Errorf("listener fd %d: sock_diag: %w", fd, err)
	}
	msgs, err := syscall.ParseNetlinkMessage(resp[:n])
	if err != nil || len(msgs) == 0 {
		return 0, fmt.Errorf("listener fd %d: sock_diag: unreadable answer: %v", fd, err)
	}
	m := msgs[0]
	if m.Header.Type == unix.NLMSG_ERROR {
		errno := unix.Errno(-int32(*(*int32)(unsafe.Pointer(&m.Data[0]))))
		return 0, fmt.Errorf("listener fd %d (inode %d): sock_diag: %w", fd, st.Ino, errno)
	}
	return rqlenAttr(fd, m.Data)
}

// rqlenAttr finds UNIX_DIAG_RQLEN among the attributes after the
// unix_diag_msg header.
func rqlenAttr(fd int, data []byte) (int, error) {
	const msgLen = 16 // struct unix_diag_msg
	for b := data[min(msgLen, len(data)):]; len(b) >= unix.SizeofRtAttr; {
		a := (*unix.RtAttr)(unsafe.Pointer(&b[0]))
		if int(a.Len) < unix.SizeofRtAttr || int(a.Len) > len(b) {
			break
		}
		if a.Type == unixDiagRQLen && a.Len >= unix.SizeofRtAttr+8 {
			return int(*(*uint32)(unsafe.Pointer(&b[unix.SizeofRtAttr]))), nil
		}
		b = b[min(len(b), (int(a.Len)+3)&^3):]
	}
	return 0, fmt.Errorf("listener fd %d: sock_diag: no UNIX_DIAG_RQLEN in the answer", fd)
}

// From linux/unix_diag.h.
const (
	udiagShowRQLen = 0x10
	unixDiagRQLen  = 4
)

type unixDiagReq struct {
	Family   uint8
	Protocol uint8
	Pad      uint16
	States   uint32
	Ino      uint32
	Show     uint32
	Cookie   [2]uint32
}

type unixDiagRequest struct {
	hdr unix.NlMsghdr
	req unixDiagReq
}

// Unlink removes the Unix socket file s bound (if any), at once and for
// good: connect() to the path fails from now on with ENOENT, which a
// client can always retry elsewhere or later, while the connections
// already queued on the socket stay accept()-able. Close then leaves the
// path alone, so that a socket bound there since is never removed by
// mistake. It reports whether there was a file to remove.
func (s *Socket) Unlink() (bool, error) {
	if s.unlink == "" {
		return false, nil
	}
	path := s.unlink
	s.unlink = ""
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("unlink %s: %w", path, err)
	}
	return true, nil
}

// HandshakesPending returns how many handshakes the TCP listener fd has
// answered and not yet seen completed (SYN_RECV): connections that join
// its accept queue when their final ACK comes, an RTT or a SYN-ACK
// retransmission later. It asks sock_diag (a dump of the SYN_RECV sockets
// of the listener's port, filtered by the kernel, Linux 4.4 for request
// sockets) in the caller's network namespace, IPv4 and IPv6 (a dual-stack
// listener's IPv4 handshakes are IPv4 sockets). The error names fd.
func HandshakesPending(fd int) (int, error) {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return 0, fmt.Errorf("listener fd %d: %w", fd, err)
	}
	var port int
	var addr []byte // nil: a wildcard listener, any local address
	// Each family's dump walks the kernel's whole established hash
	// (about a millisecond on a machine with gigabytes of memory): only
	// the families the listener can take.
	families := []uint8{unix.AF_INET}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		port = a.Port
		if a.Addr != [4]byte{} {
			addr = a.Addr[:]
		}
	case *unix.SockaddrInet6:
		port = a.Port
		if a.Addr != [16]byte{} {
			addr = a.Addr[:]
		}
		families = []uint8{unix.AF_INET6}
		if v6only, err := unix.GetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY); err != nil || v6only == 0 {
			families = append(families, unix.AF_INET)
		}
	default:
		return 0, fmt.Errorf("listener fd %d: not a TCP socket (%T)", fd, sa)
	}
	nl, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return 0, fmt.Errorf("listener fd %d: sock_diag: %w", fd, err)
	}
	defer unix.Close(nl)
	n := 0
	for _, family := range families {
		k, err := dumpSynRecv(nl, family, port, addr)
		if err != nil {
			return 0, fmt.Errorf("listener fd %d: sock_diag: %w", fd, err)
		}
		n += k
	}
	return n, nil
}

// dumpSynRecv counts the SYN_RECV sockets of family on local port port
// (and local address addr, unless nil).
func dumpSynRecv(nl int, family uint8, port int, addr []byte) (int, error) {
	const (
		hdrLen     = unix.SizeofNlMsghdr
		reqLen     = 56 // struct inet_diag_req_v2
		tcpSynRecv = 3  // TCP_SYN_RECV; request sockets are TCP_NEW_SYN_RECV
		tcpNewSyn  = 12
		msgSrc     = 8 // inet_diag_msg: family, state, timer, retrans, then sport, dport, src
	)
	ne := binary.NativeEndian
	req := make([]byte, hdrLen+reqLen)
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	ne.PutUint32(req[8:], 1)
	req[hdrLen], req[hdrLen+1] = family, unix.IPPROTO_TCP
	ne.PutUint32(req[hdrLen+4:], 1<<tcpSynRecv|1<<tcpNewSyn)
	binary.BigEndian.PutUint16(req[hdrLen+8:], uint16(port)) // the kernel filters on it
	if err := unix.Sendto(nl, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, err
	}
	buf := make([]byte, 8*os.Getpagesize())
	count := 0
	for {
		n, _, err := unix.Recvfrom(nl, buf, 0)
		if err != nil {
			return 0, err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return 0, err
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return count, nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if errno := int32(ne.Uint32(m.Data)); errno != 0 {
						return 0, unix.Errno(-errno)
					}
				}
				return count, nil
			case unix.SOCK_DIAG_BY_FAMILY:
				if len(m.Data) < msgSrc+16 || int(binary.BigEndian.Uint16(m.Data[4:])) != port {
					continue
				}
				if addr == nil || string(m.Data[msgSrc:msgSrc+len(addr)]) == string(addr) {
					count++
				}
			}
		}
	}
}
