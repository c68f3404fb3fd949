package ports

import (
	"errors"
	"net"
	"testing"
)

func TestNext(t *testing.T) {
	never := func(int) bool { return false }
	set := func(ps ...int) func(int) bool {
		m := map[int]bool{}
		for _, p := range ps {
			m[p] = true
		}
		return func(p int) bool { return m[p] }
	}
	tests := []struct {
		name     string
		r        Range
		held     func(int) bool
		busy     func(int) bool
		want     int
		wantFull bool
	}{
		{name: "lowest first", r: Range{100, 105}, held: never, busy: never, want: 100},
		{name: "skips held", r: Range{100, 105}, held: set(100, 101), busy: never, want: 102},
		{name: "skips busy", r: Range{100, 105}, held: set(100), busy: set(101, 102), want: 103},
		{name: "fills a gap", r: Range{100, 105}, held: set(100, 102, 103), busy: never, want: 101},
		{name: "last port", r: Range{100, 102}, held: set(100, 101), busy: never, want: 102},
		{name: "all held", r: Range{100, 102}, held: set(100, 101, 102), busy: never, wantFull: true},
		{name: "held or busy", r: Range{100, 102}, held: set(100, 102), busy: set(101), wantFull: true},
		{name: "single port range", r: Range{7, 7}, held: never, busy: never, want: 7},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := Allocator{Range: tt.r, Busy: tt.busy}
			got, err := a.Next(tt.held)
			if tt.wantFull {
				if !errors.Is(err, ErrExhausted) {
					t.Fatalf("Next = %d, %v; want ErrExhausted", got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("Next = %d, %v; want %d", got, err, tt.want)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	for _, r := range []Range{{0, 10}, {10, 9}, {1, 65536}, {-1, 5}} {
		if r.Validate() == nil {
			t.Errorf("Range%v.Validate() = nil, want error", r)
		}
	}
	for _, r := range []Range{{1, 1}, {16000, 16999}, {1, 65535}} {
		if err := r.Validate(); err != nil {
			t.Errorf("Range%v.Validate() = %v", r, err)
		}
	}
	if got := (Range{16000, 16999}).Size(); got != 1000 {
		t.Errorf("Size = %d, want 1000", got)
	}
}

func TestListenProbeSeesForeignListener(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port
	probe := ListenProbe("127.0.0.1")
	if !probe(port) {
		t.Fatalf("probe(%d) = free, but a listener holds it", port)
	}
	// A range of only that port has nothing to give while it is held.
	a := Allocator{Range: Range{port, port}, Busy: probe}
	if got, err := a.Next(func(int) bool { return false }); !errors.Is(err, ErrExhausted) {
		t.Fatalf("Next = %d, %v: handed out a port a foreign process listens on", got, err)
	}
	l.Close()
	if probe(port) {
		t.Fatalf("probe(%d) = busy after the listener closed", port)
	}
	if got, err := a.Next(func(int) bool { return false }); err != nil || got != port {
		t.Fatalf("Next after close = %d, %v; want %d", got, err, port)
	}
}

func BenchmarkNext(b *testing.B) {
	held := make(map[int]bool)
	for p := 16000; p < 16999; p++ {
		held[p] = true
	}
	a := Allocator{Range: Range{16000, 16999}, Busy: func(int) bool { return false }}
	for b.Loop() {
		if _, err := a.Next(func(p int) bool { return held[p] }); err != nil {
			b.Fatal(err)
		}
	}
}
