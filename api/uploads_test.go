package api

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/mock/gomock"

	"github.com/redis-agent/redis-agent/agent"
)

// countingReader notes whether anything read it.
type countingReader struct {
	io.Reader
	reads atomic.Int32
}

func (c *countingReader) Read(p []byte) (int, error) {
	c.reads.Add(1)
	return c.Reader.Read(p)
}

func upload(h http.Handler, id string, body io.Reader) *httptest.ResponseRecorder {
	req := httptest.NewRequest("PUT", "/v1/instances/"+id+"/snapshot", body)
	req.Header.Set("Content-Type", "application/octet-stream")
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	return w
}

// Restores in progress are bounded: one beyond MaxUploads (0: the
// default) is a 503 Busy with Retry-After, answered without reading its
// body; a slot that comes free takes the next one.
func TestConcurrentUploadsAreBounded(t *testing.T) {
	for _, tt := range []struct{ option, bound int }{{2, 2}, {0, DefaultMaxUploads}} {
		t.Run(strconv.Itoa(tt.option), func(t *testing.T) {
			svc := NewMockService(gomock.NewController(t))
			h := New(Options{Service: svc, MaxUploads: tt.option})
			entered := make(chan struct{}, tt.bound+2)
			release := make(chan struct{})
			svc.EXPECT().Restore(gomock.Any(), gomock.Any(), gomock.Any(), gomock.Any(), "").DoAndReturn(
				func(_ context.Context, id string, body io.Reader, _ int64, _ string) (agent.Instance, error) {
					entered <- struct{}{}
					<-release // a slow upload
					io.Copy(io.Discard, body)
					return agent.Instance{ID: id}, nil
				}).Times(tt.bound + 1)

			var wg sync.WaitGroup
			for i := range tt.bound {
				wg.Add(1)
				go func() {
					defer wg.Done()
					if w := upload(h, "i"+strconv.Itoa(i), strings.NewReader("REDIS")); w.Code != 200 {
						t.Errorf("upload %d = %d %s", i, w.Code, w.Body.String())
					}
				}()
			}
			for range tt.bound {
				<-entered
			}

			body := &countingReader{Reader: strings.NewReader("REDIS")}
			done := make(chan *httptest.ResponseRecorder, 1)
			go func() { done <- upload(h, "more", body) }()
			var w *httptest.ResponseRecorder
			select {
			case w = <-done:
			case <-time.After(5 * time.Second):
				close(release)
				t.Fatalf("upload %d waited for a slot instead of being refused", tt.bound+1)
			}
			if w.Code != 503 || errorCode(t, w.Body.String()) != "Busy" || w.Header().Get("Retry-After") == "" ||
				!strings.Contains(w.Body.String(), strconv.Itoa(tt.bound)+" restores are in progress") {
				t.Fatalf("upload %d = %d %v %s; want 503 Busy with Retry-After", tt.bound+1, w.Code, w.Header(), w.Body.String())
			}
			if n := body.reads.Load(); n != 0 {
				t.Fatalf("the refused upload's body was read %d times", n)
			}

			close(release)
			wg.Wait()
			if w := upload(h, "more", strings.NewReader("REDIS")); w.Code != 200 {
				t.Fatalf("upload after the others finished = %d %s", w.Code, w.Body.String())
			}
		})
	}
}
