package procfs

import (
	"errors"
	"io/fs"
	"os"
	"testing"
	"time"
)

// A real line (of `sleep`), with the fields after the command numbered
// from 3.
const sleepStat = "4242 (sleep) S 1 4242 4242 0 -1 4194304 93 0 0 0 7 5 0 0 20 0 1 0 123456 2215936 129 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0 0 0 0 0 0 0 0 0\n"

func TestParseStat(t *testing.T) {
	for _, tt := range []struct {
		name string
		in   string
		want Stat
		err  bool
	}{
		{name: "sleep", in: sleepStat, want: Stat{State: 'S', UTime: 7, STime: 5, StartTime: 123456, RSSPages: 129}},
		{name: "a command with spaces and parentheses", in: "7 (redis-server ) (x) Z 1 7 7 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 99 0 3 0",
			want: Stat{State: 'Z', UTime: 1, STime: 2, StartTime: 99, RSSPages: 3}},
		{name: "no parenthesis", in: "7 redis S 1", err: true},
		{name: "nothing after the command", in: "7 (redis)", err: true},
		{name: "short", in: "7 (redis) S 1 7 7 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 99", err: true},
		{name: "a start time that is not a number", in: "7 (r) S 1 7 7 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 x 0 3 0", err: true},
		{name: "a state of two letters", in: "7 (r) SS 1 7 7 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 99 0 3 0", err: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseStat([]byte(tt.in))
			if tt.err {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("ParseStat = %+v, %v; want ErrMalformed", got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ParseStat = %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestStatFigures(t *testing.T) {
	st := Stat{State: 'Z', UTime: 150, STime: 50, RSSPages: 2}
	if got := st.CPU(); got != 2*time.Second {
		t.Errorf("CPU = %v, want 2s", got)
	}
	if got, want := st.RSSBytes(), 2*int64(os.Getpagesize()); got != want {
		t.Errorf("RSSBytes = %d, want %d", got, want)
	}
	for state, gone := range map[byte]bool{'Z': true, 'X': true, 'S': false, 'R': false, 'T': false} {
		if got := (Stat{State: state}).Gone(); got != gone {
			t.Errorf("Stat{State: %q}.Gone() = %v", state, got)
		}
	}
}

func TestReadStat(t *testing.T) {
	st, err := ReadStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if st.Gone() || st.StartTime == 0 || st.RSSBytes() < 1<<20 || st.RSSBytes() > 1<<34 {
		t.Fatalf("ReadStat(self) = %+v", st)
	}
	if _, err := ReadStat(-1); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("ReadStat(-1) error = %v, want fs.ErrNotExist", err)
	}
}

func FuzzParseStat(f *testing.F) {
	f.Add([]byte(sleepStat))
	f.Add([]byte("1 () ) R"))
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := ParseStat(b)
		if err != nil && st != (Stat{}) {
			t.Fatalf("ParseStat = %+v with error %v", st, err)
		}
	})
}
