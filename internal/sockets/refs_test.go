package sockets

import (
	"errors"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestListenerRefs, on IPv4, IPv6 and a dual-stack listener taking IPv4:
// the count rises by one for a handshake held in SYN_RECV (by
// TCP_DEFER_ACCEPT, until its client sends) and by one for a connection in
// the accept queue, agrees with QueueLen plus HandshakesPending, and is
// back at the idle count once both are accepted. Forty other listeners
// come first, so the line is found across the reads' boundaries wherever
// the kernel's hash puts it.
func TestListenerRefs(t *testing.T) {
	for i := range 40 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("listener %d: %v", i, err)
		}
		defer ln.Close()
	}
	for _, tc := range []struct {
		name   string
		family int
		sa     unix.Sockaddr
		dialTo string // "": the listener's own address
	}{
		{"ipv4", unix.AF_INET, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}, ""},
		{"ipv6", unix.AF_INET6, &unix.SockaddrInet6{Addr: [16]byte{15: 1}}, ""},
		{"dual-stack", unix.AF_INET6, &unix.SockaddrInet6{}, "127.0.0.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fd, addr := rawListener(t, tc.family, tc.sa)
			if tc.dialTo != "" {
				_, port, _ := net.SplitHostPort(addr)
				addr = net.JoinHostPort(tc.dialTo, port)
			}
			idle := refs(t, fd)
			held := dial(t, addr) // SYN_RECV for the listener once the client is connected
			if got := refs(t, fd); got != idle+1 {
				t.Fatalf("with one handshake held: %d references, want %d", got, idle+1)
			}
			queuedConn := dial(t, addr)
			if _, err := queuedConn.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			waitQueueLen(t, fd, 1)
			got := refs(t, fd)
			q, _ := QueueLen(fd)
			h, err := HandshakesPending(fd)
			if err != nil {
				t.Fatal(err)
			}
			if got != idle+2 || got-idle != q+h {
				t.Fatalf("one held, one queued: %d references (idle %d), QueueLen %d, HandshakesPending %d; want idle+2, the same as the two", got, idle, q, h)
			}
			ln := fileListener(t, fd)
			if _, err := held.Write([]byte("y")); err != nil {
				t.Fatal(err)
			}
			for range 2 {
				c, err := ln.Accept()
				if err != nil {
					t.Fatal(err)
				}
				c.Close()
			}
			if got := refs(t, fd); got != idle {
				t.Fatalf("both accepted: %d references, want the idle %d", got, idle)
			}
		})
	}
}

// TestListenerRefsNotListed: a socket that is bound but not listening, or
// connected (its line is in the file, after the listening section), is
// not in the listening section, and the error says so.
func TestListenerRefsNotListed(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c := dial(t, ln.Addr().String())
	var cerr error
	if err := control(t, c.(*net.TCPConn), func(fd int) error { _, cerr = ListenerRefs(fd); return nil }); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(cerr, ErrNotListed) {
		t.Fatalf("ListenerRefs of a connected socket: %v, want ErrNotListed", cerr)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if n, err := ListenerRefs(fd); !errors.Is(err, ErrNotListed) {
		t.Fatalf("ListenerRefs of a bound socket = %d, %v; want ErrNotListed", n, err)
	}
}

func refs(t *testing.T, fd int) int {
	t.Helper()
	n, err := ListenerRefs(fd)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// BenchmarkListenerRefs reads the count of the middle socket of a
// reuseport group of three, as the supervisor reads an old generation's,
// beside HandshakesPending's dump for the same socket and a read of the
// whole file.
func BenchmarkListenerRefs(b *testing.B) {
	base, err := BindReusePort(Spec{Name: "b", Network: "tcp4", Address: "127.0.0.1:0"})
	if err != nil {
		b.Fatal(err)
	}
	defer base.Close()
	old, err := JoinGroup(base.FD)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(old)
	cur, err := JoinGroup(base.FD)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(cur)
	if err := Steer(base.FD, 2); err != nil {
		b.Fatal(err)
	}
	b.Run("ListenerRefs", func(b *testing.B) {
		for b.Loop() {
			if _, err := ListenerRefs(old); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("HandshakesPending", func(b *testing.B) {
		for b.Loop() {
			if _, err := HandshakesPending(old); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("os.ReadFile", func(b *testing.B) {
		for b.Loop() {
			if _, err := os.ReadFile("/proc/net/tcp"); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// The kernel behaviour the supervisor's choice of sockets relies on for
// ListenerRefs' speed (supervise's freeMember): the IPv4 sockets of a
// reuseport group are listed newest first, so the group's first socket
// (the listener's own) comes after every later one.
func TestIPv4GroupListedNewestFirst(t *testing.T) {
	base, err := BindReusePort(Spec{Name: "t", Network: "tcp4", Address: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	defer base.Close()
	want := []int{base.FD}
	for range 2 {
		fd, err := JoinGroup(base.FD)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		want = append([]int{fd}, want...)
	}
	var wantIno []string
	for _, fd := range want {
		ino, err := Inode(fd)
		if err != nil {
			t.Fatal(err)
		}
		wantIno = append(wantIno, strconv.FormatUint(ino, 10))
	}
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	listed := map[string]bool{}
	for _, ino := range wantIno {
		listed[ino] = true
	}
	var got []string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 9 && listed[f[9]] {
			got = append(got, f[9])
		}
	}
	if strings.Join(got, " ") != strings.Join(wantIno, " ") {
		t.Fatalf("the group's sockets listed as inodes %v, want newest first %v", got, wantIno)
	}
}
