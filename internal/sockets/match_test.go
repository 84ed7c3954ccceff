package sockets

import (
	"net"
	"strings"
	"syscall"
	"testing"
)

func fdOf(t *testing.T, c syscall.Conn) int {
	t.Helper()
	fd, err := DupFD(c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	return fd
}

func TestSpecMatches(t *testing.T) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fd := fdOf(t, l.(*net.TCPListener))
	_, port, _ := net.SplitHostPort(l.Addr().String())
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	udp := fdOf(t, pc.(*net.UDPConn))
	for _, c := range []struct {
		listen string
		fd     int
		err    string // "" for a match
	}{
		{"127.0.0.1:" + port, fd, ""},
		{"tcp4://127.0.0.1:" + port, fd, ""},
		{"127.0.0.1:0", fd, ""},
		{"localhost:" + port, fd, ""},
		{"tcp6://[::1]:" + port, fd, "IPv4"},
		{"127.0.0.2:" + port, fd, "not 127.0.0.2"},
		{":" + port, fd, "every address"},
		{"udp://127.0.0.1:0", fd, "not a datagram"},
		{"127.0.0.1:0", udp, "not a stream"},
		{"udp://127.0.0.1:0", udp, ""},
		{"unix:///tmp/x.sock", fd, "not a Unix"},
	} {
		spec, err := ParseSpec(c.listen)
		if err != nil {
			t.Fatal(err)
		}
		err = spec.Matches(c.fd)
		switch {
		case c.err == "" && err != nil:
			t.Errorf("%s: %v, want a match", c.listen, err)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("%s: %v, want an error with %q", c.listen, err, c.err)
		}
	}
}
