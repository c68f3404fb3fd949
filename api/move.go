package api

import (
	"net/http"
	"time"

	"github.com/gorilla/mux"

	"github.com/redis-agent/redis-agent/apitype"
)

// The steps of a replication move, as a broker drives them (see
// agent/move.go).

func (s *server) startMove(w http.ResponseWriter, r *http.Request) {
	p, err := s.svc.StartMove(r.Context(), mux.Vars(r)["id"])
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, p)
}

func (s *server) replication(w http.ResponseWriter, r *http.Request) {
	st, err := s.svc.Replication(r.Context(), mux.Vars(r)["id"])
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *server) cutover(w http.ResponseWriter, r *http.Request) {
	var req apitype.Cutover
	if !decode(w, r, &req) {
		return
	}
	off, err := s.svc.Cutover(r.Context(), mux.Vars(r)["id"], time.Duration(req.TimeoutMS)*time.Millisecond)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, apitype.Cutover{TimeoutMS: req.TimeoutMS, Offset: off})
}

func (s *server) forward(w http.ResponseWriter, r *http.Request) {
	var req apitype.Forward
	if !decode(w, r, &req) {
		return
	}
	if err := s.svc.Forward(r.Context(), mux.Vars(r)["id"], req.Host, req.Port, time.Duration(req.TTLSeconds)*time.Second); err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *server) abortMove(w http.ResponseWriter, r *http.Request) {
	if err := s.svc.AbortMove(r.Context(), mux.Vars(r)["id"]); err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *server) promote(w http.ResponseWriter, r *http.Request) {
	var req apitype.Promote
	if !decode(w, r, &req) {
		return
	}
	if err := s.svc.Promote(r.Context(), mux.Vars(r)["id"], req.Offset, time.Duration(req.TimeoutMS)*time.Millisecond); err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

// setDrain sets or clears the drain mark.
func (s *server) setDrain(on bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if err := s.svc.SetDraining(r.Context(), on); err != nil {
			s.fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, struct{}{})
	}
}
