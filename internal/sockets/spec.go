// Package sockets parses listener addresses, binds them, and holds their fds
// the way the supervisor passes them on: one shared open socket per listener,
// never re-bound (SO_REUSEPORT groups drop queued connections when a member
// closes), and always non-blocking in the supervisor.
package sockets

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// Spec is a parsed --listen value: [NAME=]ADDR.
type Spec struct {
	// Name is the LISTEN_FDNAMES entry: from NAME=, or derived from ADDR.
	Name string
	// Network is one of tcp, tcp4, tcp6, unix, udp, udp4, udp6, unixgram.
	Network string
	// Address is HOST:PORT for IP networks, a filesystem path (or an
	// abstract name starting with "@") for Unix ones.
	Address string
}

// String gives the address back in URL form, e.g. tcp://127.0.0.1:8080.
func (s Spec) String() string { return s.Network + "://" + s.Address }

// Stream reports whether the listener accepts connections (tcp, unix).
func (s Spec) Stream() bool { return !strings.HasPrefix(s.Network, "udp") && s.Network != "unixgram" }

// ParseSpec parses a --listen value:
//
//	[NAME=]tcp://HOST:PORT | tcp4://… | tcp6://… | udp://HOST:PORT | udp4://… | udp6://…
//	[NAME=]unix:///PATH | unixgram:///PATH | unix://@ABSTRACT
//	[NAME=]HOST:PORT  (tcp)
//
// NAME must be a valid LISTEN_FDNAMES entry (sd_listen_fds_with_names(3)):
// at most 255 printable ASCII characters, no ':'. Without NAME, the name is
// derived from ADDR: "tcp-127.0.0.1-8080", "unix-/run/app.sock".
// The error names the value and what is wrong with it.
func ParseSpec(v string) (Spec, error) {
	var s Spec
	addr := v
	// NAME= is recognised only before a scheme or a bare host:port, so that a
	// path or abstract name containing '=' still parses.
	if i := strings.IndexByte(v, '='); i >= 0 && !strings.Contains(v[:i], "/") {
		s.Name, addr = v[:i], v[i+1:]
		if err := checkName(s.Name); err != nil {
			return Spec{}, fmt.Errorf("--listen %q: %w", v, err)
		}
	}
	scheme, rest, ok := strings.Cut(addr, "://")
	if !ok {
		scheme, rest = "tcp", addr
	}
	s.Network = scheme
	switch scheme {
	case "tcp", "tcp4", "tcp6", "udp", "udp4", "udp6":
		host, port, err := net.SplitHostPort(rest)
		if err != nil {
			return Spec{}, fmt.Errorf("--listen %q: want HOST:PORT: %w", v, err)
		}
		if _, err := strconv.ParseUint(port, 10, 16); err != nil {
			if _, lerr := net.LookupPort(scheme, port); lerr != nil {
				return Spec{}, fmt.Errorf("--listen %q: port %q is not a number from 0 to 65535 nor a service name", v, port)
			}
		}
		if strings.ContainsAny(host, " /") {
			return Spec{}, fmt.Errorf("--listen %q: host %q is not a host name or IP address", v, host)
		}
		s.Address = net.JoinHostPort(host, port)
	case "unix", "unixgram":
		if rest == "" || (rest[0] != '/' && rest[0] != '@') {
			return Spec{}, fmt.Errorf("--listen %q: want %s:///ABSOLUTE/PATH or %s://@ABSTRACT", v, scheme, scheme)
		}
		if len(rest) > 107 {
			return Spec{}, fmt.Errorf("--listen %q: path is %d bytes, longer than a Unix socket address holds (107)", v, len(rest))
		}
		s.Address = rest
	default:
		return Spec{}, fmt.Errorf("--listen %q: unknown scheme %q (want tcp, tcp4, tcp6, unix, udp, udp4, udp6 or unixgram)", v, scheme)
	}
	if s.Name == "" {
		s.Name = s.Network + "-" + strings.NewReplacer(":", "-", "[", "", "]", "").Replace(s.Address)
		if len(s.Name) > 255 {
			s.Name = s.Name[:255]
		}
	}
	return s, nil
}

// ValidName reports whether n is a valid LISTEN_FDNAMES entry.
func ValidName(n string) bool { return checkName(n) == nil }

func checkName(n string) error {
	if n == "" {
		return fmt.Errorf("empty NAME before '='")
	}
	if len(n) > 255 {
		return fmt.Errorf("NAME is %d bytes, longer than 255", len(n))
	}
	for _, c := range []byte(n) {
		if c < 0x21 || c > 0x7e || c == ':' {
			return fmt.Errorf("NAME %q has character %q: LISTEN_FDNAMES entries are printable ASCII without ':' or spaces", n, c)
		}
	}
	return nil
}
