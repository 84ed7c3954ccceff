package sockets

import (
	"fmt"
	"net"
	"strconv"

	"golang.org/x/sys/unix"
)

// Matches reports whether the open socket fd is what spec would bind: the
// same kind (stream and listening, or datagram), the same family (Unix or
// IP, and IPv4 or IPv6 for tcp4/udp4 and tcp6/udp6) and the same address
// (the same path; for IP the same port, any port for port 0, and the same
// host, any unspecified address matching an empty or unspecified host).
// When it does not, the error says what differs. A host name is resolved.
func (spec Spec) Matches(fd int) error {
	typ, err := spec.matchKind(fd)
	if err != nil {
		return err
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return fmt.Errorf("getsockname: %w", err)
	}
	_, got := describe(sa, typ)
	var ip net.IP
	var port int
	switch a := sa.(type) {
	case *unix.SockaddrUnix:
		if spec.Network != "unix" && spec.Network != "unixgram" {
			return fmt.Errorf("bound to Unix address %q, not an IP address", a.Name)
		}
		if a.Name != spec.Address {
			return fmt.Errorf("bound to %q, not %q", a.Name, spec.Address)
		}
		return nil
	case *unix.SockaddrInet4:
		if last := spec.Network[len(spec.Network)-1]; last == '6' {
			return fmt.Errorf("bound to IPv4 address %s", got)
		}
		ip, port = net.IP(a.Addr[:]), a.Port
	case *unix.SockaddrInet6:
		if last := spec.Network[len(spec.Network)-1]; last == '4' {
			return fmt.Errorf("bound to IPv6 address %s", got)
		}
		ip, port = net.IP(a.Addr[:]), a.Port
	default:
		return fmt.Errorf("bound to an address of another family")
	}
	if spec.Network == "unix" || spec.Network == "unixgram" {
		return fmt.Errorf("bound to IP address %s, not a Unix address", got)
	}
	return spec.matchIP(ip, port, got)
}

// matchKind checks that fd is a listening stream socket, or a datagram
// socket, as spec wants, and returns its SO_TYPE.
func (spec Spec) matchKind(fd int) (int, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return 0, fmt.Errorf("socket type: %w", err)
	}
	if spec.Stream() {
		if typ != unix.SOCK_STREAM {
			return 0, fmt.Errorf("not a stream socket")
		}
		if acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc != 1 {
			return 0, fmt.Errorf("not a listening socket")
		}
	} else if typ != unix.SOCK_DGRAM {
		return 0, fmt.Errorf("not a datagram socket")
	}
	return typ, nil
}

// matchIP checks an IP socket's address, ip and port (got as described
// in errors), against spec's host and port.
func (spec Spec) matchIP(ip net.IP, port int, got string) error {
	host, ps, err := net.SplitHostPort(spec.Address)
	if err != nil {
		return err
	}
	want, err := strconv.Atoi(ps)
	if err != nil {
		if want, err = net.LookupPort(spec.Network, ps); err != nil {
			return err
		}
	}
	if want != 0 && want != port {
		return fmt.Errorf("bound to %s, not port %d", got, want)
	}
	if host == "" {
		if !ip.IsUnspecified() {
			return fmt.Errorf("bound to %s, not to every address", got)
		}
		return nil
	}
	if h := net.ParseIP(host); h != nil {
		if h.Equal(ip) || h.IsUnspecified() && ip.IsUnspecified() {
			return nil
		}
		return fmt.Errorf("bound to %s, not %s", got, spec.Address)
	}
	ips, err := net.LookupIP(host)
	if err != nil {
		return err
	}
	for _, h := range ips {
		if h.Equal(ip) {
			return nil
		}
	}
	return fmt.Errorf("bound to %s, not an address of %q", got, host)
}

// KeepPath makes Close leave the Unix socket file in place: the socket
// outlives this process (in systemd's fd store) and stays reachable there.
// A file left once nothing holds the socket is stale, and Bind replaces it.
func (s *Socket) KeepPath() { s.unlink = "" }
